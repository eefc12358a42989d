r"""ResNet-50 trained from scratch on ImageNet-1k: the classic 90-epoch SGD recipe with the large-batch rules
of Goyal et al. 2017 ("Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour") and the refinements of
He et al. 2019 ("Bag of Tricks for Image Classification with Convolutional Neural Networks") that need no new
ops: cosine decay, no bias decay, zero-init of each block's last BatchNorm, label smoothing. Expect ~77% top-1.

  python main.py --config=configs/resnet50_imagenet.py --workdir=gs://BUCKET/r50 \
      --config.data.train.data_dir=gs://BUCKET/tensorflow_datasets      # the eval block shares it
  python main.py --config=configs/resnet50_imagenet.py:batch_size=256 ...   # lr and warmup follow the batch
  python main.py --config=configs/resnet50_imagenet.py:runlocal --workdir=/tmp/r50  # the same recipe, toy size

Not here, for want of ops or schedules: Goyal's step decay (x0.1 at epochs 30, 60, 80; cosine instead, as
Bag of Tricks 5.1 and Flax's imagenet example), and the color jitter and PCA lighting noise of the fb.resnet
augmentation (Bag of Tricks 2.1); the crop and flip are the same.
"""

import math

from configs import common
from lvm_jax.train import config as config_lib

NUM_CLASSES = 1000
EPOCHS = 90  # He et al. 2016 / Goyal et al. 2017 5.1
WARMUP_EPOCHS = 5  # Goyal et al. 2017 2.2 (gradual warmup)
BATCH_SIZE = 1024
BASE_LR, BASE_BATCH = 0.1, 256  # Goyal et al. 2017 2.1: lr = 0.1 * batch / 256 (so 0.4 at 1024)


def _pp_train(size: int) -> str:
  # Random-size crop (area 8%-100%, aspect 3/4-4/3, bilinear) and flip (Goyal 5.1; Bag of Tricks 2.1).
  return f"decode_inception_crop({size})|flip_lr"


def _pp_eval(size: int) -> str:
  # Shorter side to 256, central 224 crop (Bag of Tricks 2.1; torchvision's reference eval).
  return f"decode|resize_small({size * 256 // 224})|central_crop({size})"


def get_config(arg=None):
  args = config_lib.parse_arg(arg, batch_size=BATCH_SIZE, runlocal=False)
  # The lr follows the batch by the paper's linear scaling rule; warmup is in epochs (so steps follow it too).
  batch_size = common.RUNLOCAL_BATCH_SIZE if args.runlocal else args.batch_size
  c = config_lib.defaults()
  c.model = "resnet50"
  # gamma = 0 in the last BatchNorm of every residual block (Goyal 5.1, Bag of Tricks 3.1); BatchNorm momentum
  # 0.9 in Flax's convention (torch's 0.1), eps 1e-5.
  c.model_args = dict(zero_init_last=True, bn_momentum=0.9, bn_eps=1e-5, drop_path=0.0)  # no stochastic depth
  c.num_classes = NUM_CLASSES
  c.dtype = "bfloat16"  # as Flax's imagenet example on TPU (half_precision); parameters stay float32

  # Reported on the 50k "validation" images; for hyper-parameter search hold out a minival instead
  # (big_vision): --config.data.train.split='train[:99%]' --config.data.eval.split='train[99%:]'.
  # --config.data.train.data_dir sets the eval block's too.
  c.data.train, c.data.eval = common.tfds_blocks("imagenet2012", "train", "validation")
  c.data.pp_train = _pp_train(224)
  c.data.pp_eval = _pp_eval(224)
  c.data.normalize = "imagenet"
  c.data.batch_size = batch_size
  c.data.shuffle_buffer = 50_000

  steps_per_epoch = common.IMAGENET_TRAIN_EXAMPLES / batch_size
  c.num_epochs = float(EPOCHS)
  c.label_smoothing = 0.1  # Bag of Tricks 5.2
  # SGD with Nesterov momentum 0.9 (Bag of Tricks 2.1; Flax's imagenet example), L2 weight decay 1e-4 (He et al.
  # 2016) on conv and dense kernels only: no decay on biases and BatchNorm scale/bias (Bag of Tricks 3.1).
  # Linear warmup from 0 over 5 epochs, then cosine to 0 (Bag of Tricks 5.1). No clipping.
  c.optimizer.name = "sgd"
  c.optimizer.lr = BASE_LR * batch_size / BASE_BATCH
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule.warmup_steps = math.ceil(WARMUP_EPOCHS * steps_per_epoch)
  c.optimizer.schedule.decay = "cosine"
  c.log_every_steps = 100
  c.eval_every_steps = math.ceil(5 * steps_per_epoch)  # every 5 epochs
  c.checkpoint_every_steps = 1000

  if args.runlocal:  # the same recipe at toy size (a tiny bottleneck ResNet on the built-in digits)
    c.model_args.update(dict(stage_sizes=(1, 1, 1, 1), width=8))
    common.digits_for_imagenet(c)
    c.data.pp_train = _pp_train(32)
    c.data.pp_eval = _pp_eval(32)
    common.runlocal(c)
  return c
