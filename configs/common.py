"""What several recipes share: ImageNet's TFDS blocks, the DeiT augmentation (also Swin's), the ViT paper's
fine-tuning optimizer, and the run length of every recipe's `runlocal` variant. Data only, like the recipes."""

import re

from ml_collections.config_dict import FieldReference, placeholder

IMAGENET_TRAIN_EXAMPLES = 1_281_167  # TFDS imagenet2012 "train"
RUNLOCAL_BATCH_SIZE = 16  # 2 examples on each of 8 (fake CPU) devices


def tfds_blocks(name: str, train_split: str, eval_split: str) -> tuple[dict, dict]:
  """(data.train, data.eval) for a TFDS dataset, sharing one FieldReference per setting: setting
  --config.data.train.data_dir (or download, manual_dir) sets the eval block's too."""
  shared = dict(
    kind="tfds", name=name, data_dir=placeholder(str), download=FieldReference(False), manual_dir=placeholder(str)
  )  # e.g. imagenet2012's archives, put there by hand
  return dict(shared, split=train_split), dict(shared, split=eval_split)


def deit_pp_train(size: int, num_classes: int) -> str:
  # timm's create_transform as DeiT (Touvron et al. 2021, Table 9) and Swin (Liu et al. 2021, A2.1) call it:
  # RandomResizedCrop (bicubic, scale 0.08-1, ratio 3/4-4/3), flip, rand-m9 (2 ops); label smoothing 0.1 inside
  # mixup's soft labels, as timm's Mixup does; mixup alpha 0.8 / cutmix alpha 1.0, one per batch (switch 0.5).
  return (
    f"decode_inception_crop({size}, method='bicubic')|flip_lr|randaugment(2, 9)|"
    f"onehot({num_classes}, smoothing=0.1)|mixup_cutmix(0.8, 1.0, switch_prob=0.5)"
  )


def deit_pp_eval(size: int) -> str:
  # Resize the shorter side to size / 0.875 (bicubic), central crop (DeiT and Swin's TEST.CROP).
  return f"decode|center_crop_fraction({size}, crop_fraction=0.875, method='bicubic')"


def vit_transfer_optimizer(c, lr: float, warmup_steps: int) -> None:
  """The ViT paper's fine-tuning optimizer (Dosovitskiy et al. 2021, B.1.1; big_vision transfer.py): SGD momentum
  0.9, no weight decay, gradient clipping at global norm 1, linear warmup then cosine to 0."""
  c.optimizer.name = "sgd"
  c.optimizer.lr = lr
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_norm = 1.0
  c.optimizer.schedule.warmup_steps = warmup_steps
  c.optimizer.schedule.decay = "cosine"


def runlocal(c) -> None:
  """The run length of a recipe's toy variant: 4 float32 steps of 16 examples (2 on each of 8 fake CPU
  devices), logged and checkpointed every 2, evaluated at the end: the tests run every real recipe this way."""
  c.dtype = "float32"
  c.data.batch_size = RUNLOCAL_BATCH_SIZE
  c.data.shuffle_buffer = 500
  c.num_epochs = 0.0
  c.num_steps = 4
  c.optimizer.schedule.warmup_steps = 2
  c.log_every_steps = 2
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 2


def digits_for_imagenet(c) -> None:
  """A toy variant's data: the built-in digits through the same TFDS source kind as the ImageNet blocks."""
  c.num_classes = 10
  c.data.train.update(dict(name="digits", split="train"))
  c.data.eval.update(dict(name="digits", split="test[:64]"))


def tfds_detection_blocks(name: str, train_split: str, eval_split: str) -> tuple[dict, dict]:
  """(data.train, data.eval) for a TFDS detection dataset (coco/2017, kitti), sharing data_dir / download /
  manual_dir as tfds_blocks does."""
  shared = dict(
    kind="tfds_detection",
    name=name,
    data_dir=placeholder(str),
    download=FieldReference(False),
    manual_dir=placeholder(str),
  )
  return dict(shared, split=train_split), dict(shared, split=eval_split)


def detection_runlocal(c) -> None:
  """A detection recipe's toy variant: runlocal's 4 steps on the built-in digits_detection at a 64 px canvas, with
  a narrow ResNet from scratch under a 32-channel FPN (no checkpoint to load); the recipe's head, loss, optimizer
  and ops otherwise."""
  runlocal(c)
  c.pretrained = None
  c.detection.weights = None
  c.model = "resnet18"
  c.model_args.update(width=8)
  c.detection.fpn_channels = 32  # GroupNorm(32) in FCOS and RetinaNet v2 heads
  c.detection.anchor_size = 16
  c.data.train = dict(kind="digits_detection", split="train")
  c.data.eval = dict(kind="digits_detection", split="test")
  c.data.normalize = "imagenet"
  for key in ("pp_train", "pp_eval"):  # the recipe's ops, at the toy canvas
    c.data[key] = re.sub(r"(det_resize_pad|det_scale_jitter)\((\d+)(, max_size=\d+)?", r"\1(64", c.data[key])
  c.optimizer.frozen = None


def torchvision_detection_optimizer(c, epochs: int, lr_epochs: tuple, warmup_steps: int) -> None:
  """torchvision's detection references' optimizer: SGD lr 0.01 (batch 16), momentum 0.9, weight decay 1e-4, linear
  warmup, lr x0.1 at each of lr_epochs (MultiStepLR), the stem and first stage frozen (trainable_backbone_layers=3)."""
  c.num_epochs = float(epochs)
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule.warmup_steps = warmup_steps
  c.optimizer.schedule.decay = "steps"
  c.optimizer.schedule.boundaries = tuple(e / epochs for e in lr_epochs)
  c.optimizer.frozen = (r"^backbone/stem_", r"^backbone/stage_0_")
