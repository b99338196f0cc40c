"""Meshes, logical-axis sharding rules and host-local to global arrays."""
