"""Input pipelines (grain): sources, multi-crop augmentation, iBOT block masks, batching.

They know nothing of models or of the objectives in `cfm.ssl` (which may import from here)."""
