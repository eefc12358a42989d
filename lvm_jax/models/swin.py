"""Placeholder, replaced by the SwinTransformer implementation."""
import flax.linen as nn
VARIANTS = {}
class SwinTransformer(nn.Module):
  pass
