"""Task-level code built on the backbones: classification, and later detection and style transfer."""
