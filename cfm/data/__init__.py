"""Input pipelines (grain): sources, multi-crop augmentation, batching. Know nothing of models."""
