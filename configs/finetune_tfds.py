r"""Fine-tune a pretrained checkpoint on a TFDS dataset at a new resolution, with a fresh head: the transfer
recipe of the ViT paper (Dosovitskiy et al. 2021, Appendix B.1.1 and Table 4) as big_vision's
configs/transfer.py writes it (splits, steps, warmup, crops, and the learning rate it selected per dataset).

  python main.py --config=configs/finetune_tfds.py --workdir=/tmp/pets \
      --config.data.train.data_dir=~/tensorflow_datasets --config.data.train.download=True
  python main.py --config=configs/finetune_tfds.py:dataset=cifar100,image_size=224 \
      --config.pretrained=timm/vit_base_patch16_224.augreg2_in21k_ft_in1k --workdir=...
  python main.py --config=configs/finetune_tfds.py:runlocal --config.pretrained=FOLDER --workdir=...  # toy size

Arguments: dataset (one of DATASETS), pretrained (anything lvm_jax.from_pretrained reads; also
--config.pretrained), image_size (the fine-tuning resolution; ViT position embeddings are resized, a new head of
the dataset's class count replaces the old one), eval_on_test, runlocal.
The data blocks share data_dir, download, manual_dir, image_key and label_key (set either block's).
Evaluation is on the held-out "minival" slice of the training split (big_vision), which picks the best
checkpoint; `eval_on_test` evaluates on the dataset's test split instead (for the number to report, once the
hyper-parameters are fixed). Inputs are normalized with the checkpoint's own mean/std (data.normalize=None).
"""

from ml_collections.config_dict import FieldReference, placeholder

from configs import common
from lvm_jax.train import config as config_lib

DEFAULT_PRETRAINED = "google/vit-base-patch16-224"
IMAGE_SIZE = 384  # ViT paper B.1.1: fine-tune at a higher resolution than pre-training
RUNLOCAL_IMAGE_SIZE = 32

# big_vision configs/transfer.py: train / minival / test splits, steps and warmup; lr is the one its docstring
# reports best for ViT-AugReg-B/32 (0.01, its default, where it reports none).
DATASETS = {
  "oxford_iiit_pet": dict(train="train[:90%]", minival="train[90%:]", test="test", steps=500, warmup=100, lr=0.003),
  "oxford_flowers102": dict(train="train[:90%]", minival="train[90%:]", test="test", steps=500, warmup=100, lr=0.003),
  "cifar10": dict(train="train[:98%]", minival="train[98%:]", test="test", steps=10_000, warmup=500, lr=0.003),
  "cifar100": dict(train="train[:98%]", minival="train[98%:]", test="test", steps=10_000, warmup=500, lr=0.01),
  "imagenet2012": dict(
    train="train[:99%]", minival="train[99%:]", test="validation", steps=20_000, warmup=500, lr=0.03
  ),
  # The built-in 8x8 digits (offline, seconds): a demo, and the runlocal data.
  "digits": dict(train="train[:90%]", minival="train[90%:]", test="test", steps=500, warmup=100, lr=0.01),
}


def _pp_train(size: int) -> str:
  # big_vision's inception_crop choice (its best for Pets, Flowers and ImageNet) and a flip.
  return f"decode_inception_crop({size})|flip_lr"


def _pp_eval(size: int) -> str:
  # big_vision: resize_small(448)|central_crop(384), the same ratio at other sizes.
  return f"decode|resize_small({round(size * 448 / 384)})|central_crop({size})"


def get_config(arg=None):
  args = config_lib.parse_arg(
    arg, dataset="", pretrained=DEFAULT_PRETRAINED, image_size=0, eval_on_test=False, runlocal=False
  )
  dataset = args.dataset or ("digits" if args.runlocal else "oxford_iiit_pet")
  if dataset not in DATASETS:
    raise ValueError(
      f"configs/finetune_tfds.py: dataset={dataset!r} is not one of {sorted(DATASETS)}. For another "
      "TFDS dataset start from one of them and set --config.data.train.name/split, "
      "--config.data.eval.name/split and --config.num_steps."
    )
  d = DATASETS[dataset]
  image_size = args.image_size or (RUNLOCAL_IMAGE_SIZE if args.runlocal else IMAGE_SIZE)

  c = config_lib.defaults()
  c.pretrained = args.pretrained  # its architecture is used; `model` is ignored
  c.image_size = image_size
  # num_classes stays None: the dataset's class count, a new head (zero-initialised for ViT, as the paper).
  c.dtype = "bfloat16"

  # One FieldReference per setting, in both blocks: setting either block's sets both.
  shared = dict(
    kind="tfds",
    name=dataset,
    data_dir=placeholder(str),
    download=FieldReference(False),
    manual_dir=placeholder(str),
    image_key=placeholder(str),
    label_key=placeholder(str),
  )
  c.data.train = dict(shared, split=d["train"])
  c.data.eval = dict(shared, split=d["test"] if args.eval_on_test else d["minival"])
  c.data.pp_train = _pp_train(image_size)
  c.data.pp_eval = _pp_eval(image_size)
  c.data.normalize = None  # the checkpoint's own mean/std
  c.data.batch_size = 512  # ViT paper B.1.1
  c.data.shuffle_buffer = 50_000

  c.num_steps = d["steps"]
  c.label_smoothing = 0.0
  common.vit_transfer_optimizer(c, lr=d["lr"], warmup_steps=d["warmup"])  # SGD, clipping, warmup + cosine (B.1.1)
  c.log_every_steps = 10
  c.eval_every_steps = max(1, d["steps"] // 5)
  c.checkpoint_every_steps = c.eval_every_steps

  if args.runlocal:  # the same recipe at toy size: a few steps on the digits (pass a small --config.pretrained)
    common.runlocal(c)
  return c
