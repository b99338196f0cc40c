"""Model definitions: small files, each with a variant table where it has sizes."""
