"""The logical axis names that models tag parameters and activations with, and sharding rules map to mesh axes.

One declared set shared by both sides: a sharding rule naming anything else is an error (a typo such as "embd"
would otherwise match nothing and silently replicate), and a model that tags a new name declares it here, where
every preset of lvm_jax.parallel must then say where it goes. No imports, so models can use it without the
parallel machinery.
"""

BATCH = "batch"  # examples of a batch (activations only)
LENGTH = "length"  # tokens of a sequence (ViT patches, plus the class token)
HEIGHT = "height"  # rows of a feature map (activations only)
WIDTH = "width"  # columns of a feature map (activations only)
EMBED = "embed"  # the residual stream: token features, a CNN's pooled features
MLP = "mlp"  # the hidden layer of a transformer MLP
HEADS = "heads"  # attention heads
KV = "kv"  # features of one attention head
CLASSES = "classes"  # the classifier's outputs
CONV_IN = "conv_in"  # a convolution's input channels
CONV_OUT = "conv_out"  # a convolution's output channels (and its BatchNorm's)
LAYERS = "layers"  # the stacked axis of scanned layers

NAMES = (BATCH, LENGTH, HEIGHT, WIDTH, EMBED, MLP, HEADS, KV, CLASSES, CONV_IN, CONV_OUT, LAYERS)
