"""tf.data input pipelines: sources (TFDS, image folders, the built-in digits set), preprocessing ops,
per-process sharding and assembly into global jax.Arrays."""

import tensorflow as tf

# TensorFlow only feeds the host: keep it off every accelerator so JAX owns them.
tf.config.set_visible_devices([], "GPU")
