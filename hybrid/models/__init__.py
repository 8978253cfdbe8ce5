"""The project's own checkpoints of the K2 architecture: presets, `hybrid make-tiny`, the default model."""
