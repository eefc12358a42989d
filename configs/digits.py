r"""The CPU demo: a small ViT, ResNet or Swin trained from scratch on the built-in digits (scikit-learn's 8x8
handwritten digits, prepared offline), upscaled to 32x32.

  python main.py --config=configs/digits.py --workdir=/tmp/digits              # ResNet (default)
  python main.py --config=configs/digits.py:model=vit --workdir=/tmp/digits_vit
  python main.py --config=configs/digits.py:model=swin,runlocal --workdir=...  # a few steps (tests)
"""

from ml_collections.config_dict import placeholder

from lvm_jax.train import config as config_lib

# Each family at a size that trains in a few minutes on a 2-core CPU.
MODELS = {
  "resnet": dict(model="resnet18", model_args=dict(width=32), num_epochs=15.0),
  "vit": dict(
    model="vit_ti16",
    model_args=dict(image_size=32, patch_size=8, width=96, depth=4, num_heads=3, mlp_dim=384),
    num_epochs=40.0,
  ),
  "swin": dict(
    model="swin_t",
    model_args=dict(image_size=32, patch_size=4, embed_dim=48, depths=(2, 2), num_heads=(3, 6), window_size=4),
    num_epochs=40.0,
  ),
}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, model="resnet", runlocal=False)
  if args.model not in MODELS:
    raise ValueError(f"configs/digits.py: model={args.model!r} is not one of {sorted(MODELS)}.")
  c = config_lib.defaults()
  c.model = MODELS[args.model]["model"]
  c.model_args.update(MODELS[args.model]["model_args"])
  c.num_classes = 10

  # data_dir: where TFDS keeps the prepared dataset (None: TFDS's default, ~/tensorflow_datasets).
  c.data.train = dict(kind="digits", split="train", data_dir=placeholder(str))
  c.data.eval = dict(kind="digits", split="test", data_dir=placeholder(str))
  # Digits are not mirror-symmetric: no flips. A mild random resized crop is the augmentation.
  c.data.pp_train = "decode|inception_crop(32, area_min=0.6, ratio=(0.8, 1.25))"
  c.data.pp_eval = "decode|resize(32)"
  c.data.normalize = "inception"
  c.data.batch_size = 64
  c.data.shuffle_buffer = 2_000
  c.data.num_shards = 4  # the same batches on 1, 2 or 4 hosts

  c.num_epochs = MODELS[args.model]["num_epochs"]
  c.label_smoothing = 0.1
  c.optimizer.name = "adamw"
  c.optimizer.lr = 2e-3
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 1.0
  c.optimizer.schedule.warmup_steps = 100
  c.optimizer.schedule.decay = "cosine"
  c.log_every_steps = 50
  c.eval_every_steps = 225
  c.checkpoint_every_steps = 225

  if args.runlocal:  # the same recipe, a handful of steps: how the tests run it
    c.num_epochs = 0.0
    c.num_steps = 6
    c.data.batch_size = 16
    c.optimizer.schedule.warmup_steps = 2
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  return c
