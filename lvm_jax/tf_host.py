"""TensorFlow for host-side work only (tf.data, tf.io.gfile, summaries).

Modules take `tf` from here rather than importing tensorflow themselves: TensorFlow would otherwise claim
every GPU (and reserve its memory) on its first op, leaving nothing for JAX. Importing lvm_jax's models and
train steps never imports TensorFlow at all, so they run where it is not installed.
"""

import tensorflow as tf

tf.config.set_visible_devices([], "GPU")
