r"""Fine-tune torchvision's COCO RetinaNet (ResNet-50-FPN, 36.4 COCO AP) on KITTI 2D object detection (TFDS
`kitti`: 8 classes, Car to Misc; the autonomous-driving example): the whole network starts from the COCO
checkpoint, with a new classification layer for KITTI's classes.

  python main.py --config=configs/detection_kitti.py --workdir=/tmp/kitti \
      --config.data.train.data_dir=/data/tensorflow_datasets
  python main.py --config=configs/detection_kitti.py --config.detection.weights=/data/retinanet_coco.pth ...

detection.weights is torchvision's checkpoint file or its URL (downloaded once into ~/.cache/lvm_jax).
The schedule is the COCO recipe's shortened to KITTI's size (TFDS train split: 6,347 images): SGD lr 0.01 at
batch 16, 20 epochs, lr x0.1 at epochs 14 and 18, horizontal flip, images resized to 1024 on the longer side
(KITTI's are 1242 x 375).
Arguments: runlocal (4 steps at toy size on the built-in digits_detection).
"""

from configs import common
from lvm_jax.train import config as config_lib

COCO_RETINANET = "https://download.pytorch.org/models/retinanet_resnet50_fpn_coco-eeacb38b.pth"
EPOCHS, LR_EPOCHS = 20, (14, 18)
CANVAS, MAX_BOXES = 1024, 64


def get_config(arg=None):
  args = config_lib.parse_arg(arg, runlocal=False)
  c = config_lib.defaults()
  c.task = "detection"
  c.detection.weights = COCO_RETINANET
  c.detection.torchvision_arch = "retinanet_resnet50_fpn"
  c.dtype = "bfloat16"

  c.data.train, c.data.eval = common.tfds_detection_blocks("kitti", "train", "validation")
  c.data.pp_train = f"det_decode|det_flip_lr|det_resize_pad({CANVAS})|det_pad_boxes({MAX_BOXES})"
  c.data.pp_eval = f"det_decode|det_resize_pad({CANVAS})|det_pad_boxes({MAX_BOXES})"
  c.data.normalize = "imagenet"  # torchvision's detectors' mean/std
  c.data.batch_size = 16
  c.data.shuffle_buffer = 2_000

  common.torchvision_detection_optimizer(c, EPOCHS, LR_EPOCHS, warmup_steps=200)
  c.best_metric = "AP"
  c.log_every_steps = 50
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 1_000

  if args.runlocal:
    common.detection_runlocal(c)
  return c
