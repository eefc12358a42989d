r"""RetinaNet and FCOS on ResNet-50-FPN trained on COCO 2017 as torchvision trained its released detectors
(torchvision references/detection: 26 epochs, lr steps at epochs 16 and 22, SGD lr 0.01 at batch 16 (2 images on
each of 8 GPUs), momentum 0.9, weight decay 1e-4, 1,000 warmup steps, shorter side 800 / longer at most 1333,
horizontal flip; ImageNet ResNet-50 backbone (torchvision's IMAGENET1K_V1), BatchNorm frozen, stem and first
stage frozen (trainable_backbone_layers=3)).

  python main.py --config=configs/detection_coco.py --workdir=gs://BUCKET/retinanet \
      --config.data.train.data_dir=gs://BUCKET/tensorflow_datasets                        # RetinaNet v1: 36.4 AP
  python main.py --config=configs/detection_coco.py:model=retinanet_v2 --workdir=...      # v2: 41.5 AP
  python main.py --config=configs/detection_coco.py:model=fcos --workdir=...              # FCOS: 39.2 AP

The AP figures are torchvision's for its released weights (COCO val2017 box AP), what these recipes aim at.
RetinaNet v2 (GroupNorm heads, GIoU loss, P6 from C5) was trained by torchvision with an enhanced recipe
(pytorch/vision#5756); here it takes v1's schedule with large-scale jitter (0.1-2.0 on a 1024 canvas, as
torchvision's other v2 detectors). Differences from torchvision: every image on one fixed canvas (1344 x 1344:
any orientation fits) instead of batches grouped by aspect ratio, warmup from 0 instead of lr/1000, images without
objects kept in training, and no weight decay on biases and norm scales.
Arguments: model (retinanet | retinanet_v2 | fcos), runlocal (4 steps at toy size on the built-in digits_detection).
"""

from configs import common
from lvm_jax.train import config as config_lib

MODELS = {
  "retinanet": dict(head="retinanet", version="v1"),
  "retinanet_v2": dict(head="retinanet", version="v2"),
  "fcos": dict(head="fcos", version="v1"),
}
BACKBONE = "timm/resnet50.tv_in1k"  # torchvision's ResNet50_Weights.IMAGENET1K_V1, as timm publishes it
EPOCHS, LR_EPOCHS = 26, (16, 22)
MAX_BOXES = 100  # COCO val2017's most crowded image has 63 non-crowd objects; train2017's 93


def get_config(arg=None):
  args = config_lib.parse_arg(arg, model="retinanet", runlocal=False)
  if args.model not in MODELS:
    raise ValueError(f"configs/detection_coco.py: model={args.model!r} is not one of {sorted(MODELS)}.")
  c = config_lib.defaults()
  c.task = "detection"
  c.model = "resnet50"
  c.pretrained = BACKBONE
  c.detection.update(MODELS[args.model])
  c.dtype = "bfloat16"

  c.data.train, c.data.eval = common.tfds_detection_blocks("coco/2017", "train", "validation")
  resize = f"det_resize_pad(800, max_size=1333)|det_pad_boxes({MAX_BOXES})"
  if args.model == "retinanet_v2":
    c.data.pp_train = f"det_decode|det_flip_lr|det_scale_jitter(1024, 0.1, 2.0)|det_pad_boxes({MAX_BOXES})"
  else:
    c.data.pp_train = f"det_decode|det_flip_lr|{resize}"
  c.data.pp_eval = f"det_decode|{resize}"
  c.data.normalize = None  # the backbone checkpoint's mean/std (ImageNet's, as torchvision's transform)
  c.data.batch_size = 16
  c.data.shuffle_buffer = 1_000

  common.torchvision_detection_optimizer(c, EPOCHS, LR_EPOCHS, warmup_steps=1_000)
  c.best_metric = "AP"
  c.log_every_steps = 100
  c.eval_every_steps = 7_500  # about an epoch
  c.checkpoint_every_steps = 2_500

  if args.runlocal:
    common.detection_runlocal(c)
  return c
