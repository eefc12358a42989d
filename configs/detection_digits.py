r"""Object detection on the built-in digits_detection set (scikit-learn's handwritten digits pasted on 128x128
canvases with clutter, 2,000 train / 300 held-out, generated offline on first use), trained from scratch on CPU.

  python main.py --config=configs/detection_digits.py --workdir=/tmp/det_digits            # RetinaNet, ResNet
  python main.py --config=configs/detection_digits.py:head=fcos --workdir=/tmp/det_fcos
  python main.py --config=configs/detection_digits.py:backbone=swin --workdir=...           # or backbone=vit
  python main.py --mode=predict --workdir=/tmp/det_digits --image=canvas.png --output=boxes.png

The detector is torchvision's (RetinaNet v1 / FCOS: FPN P3-P7, 4-conv towers, focal loss) at a small width: a
ResNet-18 at width 32 under a 64-channel FPN. The digits are 16-40 px on the canvas, so the anchors start at 16
px (torchvision's start at 32, for COCO's 800 px images); no horizontal flip (a mirrored digit is another glyph).
AdamW with warmup and cosine, as the digits classification recipe, in place of torchvision's SGD at batch 16.
Arguments: head (retinanet | fcos), backbone (resnet | swin | vit), runlocal (a few steps at toy size).
"""

from configs import common
from lvm_jax.train import config as config_lib

CANVAS = 128
RUNLOCAL_CANVAS = 64
MAX_BOXES = 8  # the set has 1-4 digits a canvas
BACKBONES = {
  "resnet": dict(model="resnet18", model_args=dict(width=32)),
  "swin": dict(
    model="swin_t",
    model_args=dict(
      image_size=CANVAS, patch_size=4, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 8), window_size=4
    ),
  ),
  "vit": dict(
    model="vit_ti16",
    model_args=dict(image_size=CANVAS, patch_size=8, width=96, depth=4, num_heads=3, mlp_dim=384),
  ),
}


RUNLOCAL_ARGS = {
  "resnet": dict(width=8),
  "swin": dict(image_size=RUNLOCAL_CANVAS, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
  "vit": dict(image_size=RUNLOCAL_CANVAS, width=32, depth=2, num_heads=2, mlp_dim=64),
}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, head="retinanet", backbone="resnet", runlocal=False)
  if args.backbone not in BACKBONES:
    raise ValueError(f"configs/detection_digits.py: backbone={args.backbone!r} is not one of {sorted(BACKBONES)}.")
  c = config_lib.defaults()
  c.task = "detection"
  c.model = BACKBONES[args.backbone]["model"]
  c.model_args.update(BACKBONES[args.backbone]["model_args"])
  c.detection.head = args.head
  c.detection.fpn_channels = 64
  c.detection.anchor_size = 16

  c.data.train = dict(kind="digits_detection", split="train")
  c.data.eval = dict(kind="digits_detection", split="test")
  canvas = RUNLOCAL_CANVAS if args.runlocal else CANVAS
  c.data.pp_train = f"det_decode|det_scale_jitter({canvas}, 0.75, 1.25)|det_pad_boxes({MAX_BOXES})"
  c.data.pp_eval = f"det_decode|det_resize_pad({canvas})|det_pad_boxes({MAX_BOXES})"
  c.data.normalize = "imagenet"
  c.data.batch_size = 32
  c.data.shuffle_buffer = 2_000
  c.data.num_shards = 4  # the same batches on 1, 2 or 4 hosts

  c.num_epochs = 30.0
  c.optimizer.name = "adamw"
  c.optimizer.lr = 2e-3
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 1.0
  c.optimizer.schedule.warmup_steps = 200
  c.optimizer.schedule.decay = "cosine"
  c.best_metric = "AP"
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500

  if args.runlocal:  # the same recipe at toy size: half the canvas, a narrow network, 4 steps
    common.runlocal(c)
    c.detection.fpn_channels = 32  # GroupNorm(32) in FCOS and RetinaNet v2 heads
    c.model_args.update(RUNLOCAL_ARGS[args.backbone])
  return c
