"""Training loop, checkpoints, inference and torchrun support."""
