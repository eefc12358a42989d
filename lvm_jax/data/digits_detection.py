"""`digits_detection`: a built-in detection dataset made offline from scikit-learn's real 8x8 digits.

Each 128 x 128 RGB canvas holds 1 to 4 digits (scikit-learn images, bilinearly upscaled to 16-40 px high, width
0.75-1.25 x height, in a random bright colour), placed at random without touching each other (2 px apart), over
a background with a random colour gradient, clutter that is not digits (long 1 px lines, filled blobs, rectangle
outlines, none touching a digit) and uniform noise. A digit's box is exact: the tight bounds of the pixels it
changed (its upscaled intensity, with values below one scikit-learn level, 1/16, set to zero so no invisible
fringe widens the box). Classes are "0".."9" with COCO category ids 1..10.

"train" has 2,000 canvases drawn from lvm_jax.data.digits' 1,437 train digits, "test" 300 canvases from its
360 test digits: no digit image is in both. About 2.5 digits a canvas gives ~5,000 training objects (~500 a class,
each digit image seen in ~3.5 sizes, colours and places) and ~760 held-out ones, enough to measure an AP50 near 0.9
to about +-1%; a canvas of 128 px keeps a small detector's step cheap on a CPU. Boxes are 16-40 px high and 7-45
wide (median 22 x 28), under RetinaNet's default smallest anchor (32 px at stride 8): a recipe for this set uses
smaller anchors or a larger canvas. Mirrored digits are other glyphs, so flips are no augmentation here.

The data is a fixed function of the seeds below (numpy's frozen RandomState stream, Pillow's resize and drawing):
generating it takes a few seconds, once per data_dir, written in COCO format (annotations/instances_<split>.json,
<split>/<id>.jpg) and then read by lvm_jax.data.coco_folder. Each annotation also records the scikit-learn index
of its digit ("sklearn_index").
"""

import json
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from lvm_jax.data import coco_folder, digits

VERSION = "1.0.0"
CANVAS = 128
SPLITS = {"train": (2000, 1), "test": (300, 2)}  # split -> (canvases, seed)
DIGITS_PER_CANVAS = (1, 4)
DIGIT_HEIGHT = (16, 40)
ASPECT = (0.75, 1.25)  # width / height
GAP = 2  # pixels kept free around every digit (from other digits and from clutter)
CLUTTER_PER_CANVAS = (3, 8)
CLASS_NAMES = [str(d) for d in range(10)]
# JPEG, not PNG: the noise makes PNGs ~35 KB and 1.4 ms to write, JPEGs at 95 (no chroma subsampling) ~8 KB
# and 0.2 ms; the boxes are exact for the rendered pixels, which the encoding shifts by a few levels.
JPEG_QUALITY = 95


def _default_data_dir() -> str:
  import tensorflow_datasets as tfds  # the same default as the classification digits (TFDS's data_dir)

  return tfds.core.constants.DATA_DIR


def _bright_colour(rng) -> np.ndarray:
  return rng.randint(140, 256, size=3).astype(np.float64)


def _background(rng) -> np.ndarray:
  base = rng.randint(0, 90, size=3).astype(np.float64)
  ramp = np.linspace(-0.5, 0.5, CANVAS)
  slope_y, slope_x = rng.uniform(-40, 40, size=(2, 3))
  return base + ramp[:, None, None] * slope_y + ramp[None, :, None] * slope_x


def _digit_alpha(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """An 8x8 uint8 digit upscaled to (height, width) as 0..1 intensities, fringes below 1/16 zeroed."""
  from PIL import Image

  resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR), np.float64) / 255
  return np.where(resized < 1 / 16, 0.0, resized)


def _free(rect, taken) -> bool:
  top, left, bottom, right = rect
  return all(
    bottom + GAP <= other_top or top >= other_bottom + GAP or right + GAP <= other_left or left >= other_right + GAP
    for other_top, other_left, other_bottom, other_right in taken
  )


def _clutter_mask(rng) -> np.ndarray:
  """One clutter item (a long thin line, a blob or a rectangle outline) as a 0..1 mask of the canvas."""
  from PIL import Image, ImageDraw

  mask = Image.new("L", (CANVAS, CANVAS), 0)
  draw = ImageDraw.Draw(mask)
  kind = rng.randint(3)
  x, y = rng.uniform(0, CANVAS, size=2)
  if kind == 0:
    length, angle = rng.uniform(30, 90), rng.uniform(0, np.pi)
    draw.line([(x, y), (x + length * np.cos(angle), y + length * np.sin(angle))], fill=255, width=1)
  elif kind == 1:
    rx, ry = rng.uniform(2, 8, size=2)
    draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
  else:
    w, h = rng.uniform(6, 30, size=2)
    draw.rectangle([x, y, x + w, y + h], outline=255, width=1)
  return np.asarray(mask, np.float64) / 255


def render_canvas(rng: np.random.RandomState, images: np.ndarray):
  """One canvas with digits drawn from `images` (uint8 [N, 8, 8], 0..255).

  Returns:
    (uint8 [128, 128, 3] image, float32 [n, 4] boxes x1, y1, x2, y2, int64 [n] digit indices into `images`,
    int32 [128, 128] owners: k + 1 where digit k changed the pixel, else 0).
  """
  canvas = _background(rng)
  placed, boxes, chosen = [], [], []
  alphas = []
  for _ in range(rng.randint(DIGITS_PER_CANVAS[0], DIGITS_PER_CANVAS[1] + 1)):
    which = rng.randint(len(images))
    height = rng.randint(DIGIT_HEIGHT[0], DIGIT_HEIGHT[1] + 1)
    width = int(round(height * rng.uniform(*ASPECT)))
    for _ in range(30):  # a few tries for a free spot; a crowded canvas simply gets fewer digits
      top, left = rng.randint(CANVAS - height + 1), rng.randint(CANVAS - width + 1)
      if _free((top, left, top + height, left + width), placed):
        break
    else:
      continue
    alpha = _digit_alpha(images[which], height, width)
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    placed.append((top, left, top + height, left + width))
    boxes.append([left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1])
    chosen.append(which)
    alphas.append((top, left, alpha, _bright_colour(rng)))
  owners = np.zeros((CANVAS, CANVAS), np.int32)
  for k, (top, left, alpha, _) in enumerate(alphas):
    owners[top : top + alpha.shape[0], left : left + alpha.shape[1]][alpha > 0] = k + 1
  keep_out = np.zeros((CANVAS, CANVAS), bool)
  for top, left, bottom, right in placed:
    keep_out[max(top - GAP, 0) : bottom + GAP, max(left - GAP, 0) : right + GAP] = True
  for _ in range(rng.randint(CLUTTER_PER_CANVAS[0], CLUTTER_PER_CANVAS[1] + 1)):
    mask, colour = _clutter_mask(rng), rng.randint(40, 256, size=3).astype(np.float64)
    drawn = mask > 0
    if not drawn[keep_out].any():
      alpha = mask[drawn][:, None]
      canvas[drawn] = canvas[drawn] * (1 - alpha) + colour * alpha
  for top, left, alpha, colour in alphas:
    patch = canvas[top : top + alpha.shape[0], left : left + alpha.shape[1]]
    patch[:] = patch * (1 - alpha[..., None]) + colour * alpha[..., None]
  canvas += rng.uniform(-1, 1, size=canvas.shape) * rng.uniform(4, 16)  # uniform: 3x cheaper than normal
  image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
  return image, np.array(boxes, np.float32).reshape(-1, 4), np.array(chosen, np.int64), owners


def render_split(split: str, count: Optional[int] = None):
  """Yields (image, boxes, labels, scikit-learn indices, owners) of the first `count` canvases of `split` (default:
  all), as render_canvas."""
  if split not in SPLITS:
    raise ValueError(f"digits_detection has splits {', '.join(map(repr, SPLITS))}, not {split!r}.")
  from sklearn.datasets import load_digits

  data = load_digits()
  indices = digits.split_indices(split)
  images, labels = digits.to_uint8(data.images)[indices], data.target[indices]
  total, seed = SPLITS[split]
  rng = np.random.RandomState(seed)
  for _ in range(total if count is None else count):
    image, boxes, which, owners = render_canvas(rng, images)
    yield image, boxes, labels[which].astype(np.int64), indices[which], owners


def _write(root: str) -> None:
  from PIL import Image

  os.makedirs(os.path.join(root, "annotations"))
  for split in SPLITS:
    os.makedirs(os.path.join(root, split))
    images, annotations = [], []
    for image_id, (image, boxes, labels, sklearn_index, _) in enumerate(render_split(split), start=1):
      file_name = f"{image_id:06d}.jpg"
      Image.fromarray(image).save(os.path.join(root, split, file_name), quality=JPEG_QUALITY, subsampling=0)
      images.append({"id": image_id, "file_name": file_name, "width": CANVAS, "height": CANVAS})
      for (x1, y1, x2, y2), label, index in zip(boxes.tolist(), labels.tolist(), sklearn_index.tolist()):
        annotations.append(
          {
            "id": len(annotations) + 1,
            "image_id": image_id,
            "category_id": label + 1,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": (x2 - x1) * (y2 - y1),
            "iscrowd": 0,
            "sklearn_index": index,
          }
        )
    categories = [{"id": i + 1, "name": name, "supercategory": "digit"} for i, name in enumerate(CLASS_NAMES)]
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
      json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def prepare(data_dir: Optional[str] = None) -> str:
  """The folder holding the dataset in data_dir (default: TFDS's data_dir), generated there if absent.

  Generated into a temporary folder beside it and renamed into place, so a reader never sees a partial copy and
  processes preparing the same data_dir at once each end with the one complete copy that won the rename.
  """
  data_dir = os.fspath(data_dir or _default_data_dir())
  if "://" in data_dir:
    raise ValueError(f"digits_detection is generated on local disk; data_dir {data_dir!r} is not a local path.")
  root = os.path.join(data_dir, "digits_detection", VERSION)
  if os.path.isdir(root):
    return root
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  partial = tempfile.mkdtemp(prefix=".partial-", dir=parent)
  try:
    _write(partial)
    os.rename(partial, root)  # atomic; fails when another process's copy got there first
    print(f"Prepared the built-in digits_detection dataset in {root} (once: later runs read it).")
  except OSError:
    if not os.path.isdir(root):
      raise
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return root


def digits_detection_source(split: str, data_dir: Optional[str] = None) -> coco_folder.CocoFolderSource:
  """The built-in detection set's `split` ("train": 2,000 canvases, "test": 300), prepared on first use."""
  if split not in SPLITS:
    raise ValueError(f"digits_detection has splits {', '.join(map(repr, SPLITS))}, not {split!r}.")
  root = prepare(data_dir)
  return coco_folder.CocoFolderSource(
    annotations=os.path.join(root, "annotations", f"instances_{split}.json"), images=os.path.join(root, split)
  )
