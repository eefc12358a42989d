r"""Fine-tune a pretrained checkpoint on your own image folder at a new resolution, with a fresh head: the ViT
paper's transfer recipe (Dosovitskiy et al. 2021, Appendix B.1.1), with its VTAB setting for a dataset of
unknown size (lr 0.01, 2,500 steps at batch 512) and big_vision's warmup (a fifth of the steps).

  python main.py --config=configs/finetune_folder.py:root=/data/flowers --workdir=/tmp/flowers
  python main.py --config=configs/finetune_folder.py --config.data.train.root=gs://bucket/photos \
      --config.pretrained=timm/vit_base_patch16_224.augreg2_in21k_ft_in1k --workdir=...
  python main.py --config=configs/finetune_folder.py:root=DIR,runlocal --config.pretrained=FOLDER ...  # toy size

The folder is root/<class>/*.jpg (a held-out `holdout_fraction` of each class is the eval split) or
root/<split>/<class>/*.jpg (then eval_split names the split folder to evaluate on, e.g. eval_split=val).
data.train.layout says which: "auto" (default) tells them apart, "classes" or "splits" chooses; set
--config.data.train.layout=classes when the class folders keep their images in subfolders
(root/<class>/<sub>/*.jpg), which "auto" cannot tell from split folders.
Arguments: root, eval_split, pretrained (anything lvm_jax.from_pretrained reads; also --config.pretrained),
image_size (the fine-tuning resolution; ViT position embeddings are resized), runlocal.
The data blocks share root, layout, holdout_fraction and index_path (set either block's). Class names come from the
folder names; the new head has their count. Inputs are normalized with the checkpoint's own mean/std.
"""

from ml_collections.config_dict import FieldReference, placeholder

from configs import common
from lvm_jax.train import config as config_lib

DEFAULT_PRETRAINED = "google/vit-base-patch16-224"
IMAGE_SIZE = 384  # ViT paper B.1.1: fine-tune at a higher resolution than pre-training
RUNLOCAL_IMAGE_SIZE = 32
NUM_STEPS, WARMUP_STEPS, LR = 2_500, 500, 0.01  # ViT paper B.1.1 (VTAB); warmup as big_vision transfer.py


def _pp_train(size: int) -> str:
  return f"decode_inception_crop({size})|flip_lr"


def _pp_eval(size: int) -> str:
  # big_vision: resize_small(448)|central_crop(384), the same ratio at other sizes.
  return f"decode|resize_small({round(size * 448 / 384)})|central_crop({size})"


def get_config(arg=None):
  args = config_lib.parse_arg(
    arg, root="", eval_split="validation", pretrained=DEFAULT_PRETRAINED, image_size=0, runlocal=False
  )
  image_size = args.image_size or (RUNLOCAL_IMAGE_SIZE if args.runlocal else IMAGE_SIZE)

  c = config_lib.defaults()
  c.pretrained = args.pretrained  # its architecture is used; `model` is ignored
  c.image_size = image_size
  # num_classes stays None: the folder's class count, a new head (zero-initialised for ViT, as the paper).
  c.dtype = "bfloat16"

  # One FieldReference per setting, in both blocks: --config.data.train.root sets the eval one too.
  shared = dict(
    kind="folder",
    root=FieldReference(args.root or None, field_type=str),
    layout=FieldReference("auto"),
    holdout_fraction=FieldReference(0.1),
    index_path=placeholder(str),
  )
  c.data.train = dict(shared, split="train")
  # Without split folders "validation" is the held-out part (FolderSource's holdout_split).
  c.data.eval = dict(shared, split=args.eval_split)
  c.data.pp_train = _pp_train(image_size)
  c.data.pp_eval = _pp_eval(image_size)
  c.data.normalize = None  # the checkpoint's own mean/std
  c.data.batch_size = 512  # ViT paper B.1.1
  c.data.shuffle_buffer = 50_000

  c.num_steps = NUM_STEPS
  c.label_smoothing = 0.0
  common.vit_transfer_optimizer(c, lr=LR, warmup_steps=WARMUP_STEPS)  # SGD, clipping, warmup + cosine (B.1.1)
  c.log_every_steps = 10
  c.eval_every_steps = NUM_STEPS // 5
  c.checkpoint_every_steps = c.eval_every_steps

  if args.runlocal:  # the same recipe at toy size (pass a small --config.pretrained and a small folder)
    common.runlocal(c)
  return c
