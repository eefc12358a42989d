"""Object detection: one-stage detectors (RetinaNet, FCOS) on the library's backbones, as torchvision defines them.

The ops, pure JAX, one job a module:
  boxes        box geometry (area, IoU, GIoU) and the box coders (RetinaNet's deltas, FCOS's LTRB distances)
  anchors      static per-level anchors and FPN feature sizes for a canvas, in torchvision's order
  matching     assigning padded ground truth to anchors (RetinaNet's Matcher, FCOS's center sampling)
  losses       focal loss and the RetinaNet / FCOS training losses, normalised as torchvision does
  nms          greedy (class-wise) non-maximum suppression with a fixed-size output
  postprocess  head outputs -> a fixed number of detections per image (score threshold, top-k, NMS)
The model (backbones, fpn, heads, detector) and the evaluation (coco_eval) sit beside them.

Conventions: boxes are float32 [..., 4] (x1, y1, x2, y2) in pixels of the model's input canvas; head outputs are
per-level lists (P3..P7), each level flattened row-major over locations, then anchors at a location. Everything
here is pure JAX with static shapes (ground truth padded with a box_mask), so it runs under jax.jit.

This package's __init__ stays import-light (no TensorFlow, no model code): import the submodules you need.
"""
