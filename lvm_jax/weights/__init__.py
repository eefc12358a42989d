"""Converters between lvm_jax variables and released checkpoints (transformers, timm, big_vision)."""
