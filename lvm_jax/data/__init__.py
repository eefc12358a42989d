"""tf.data input pipelines: sources (TFDS, image folders, the built-in digits set), preprocessing ops,
per-process sharding and assembly into global jax.Arrays. TensorFlow comes through lvm_jax.tf_host."""
