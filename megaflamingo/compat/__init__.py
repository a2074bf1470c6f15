"""Compatibility with the original Audio Flamingo 1 (configs and checkpoints)."""
