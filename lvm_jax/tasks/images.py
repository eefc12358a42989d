"""Images from files, PIL images or arrays, as upright 8-bit RGB PIL images, with clear errors.

The conversion is transformers' `load_image` (EXIF orientation applied, then PIL's convert("RGB"), which drops
an alpha channel rather than compositing it), so that predictions match the transformers pipeline on the same
files. One deliberate difference: 16-bit grayscale images are scaled to 8 bits; PIL's convert would saturate
nearly every pixel to white.
"""

import os
import pathlib
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps

ImageInput = Union[str, os.PathLike, PIL.Image.Image, np.ndarray]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_EXPECTED = "expected an image file (JPEG, PNG or another format Pillow reads)"


def load_image(image: ImageInput) -> PIL.Image.Image:
  """An upright RGB image from a file path, a PIL image, or a uint8 array ([H, W], [H, W, 1|3|4])."""
  if isinstance(image, (str, os.PathLike)):
    return read_image(image)
  if isinstance(image, PIL.Image.Image):
    return to_rgb(image)
  if isinstance(image, np.ndarray):
    return to_rgb(from_array(image))
  raise TypeError(f"Expected an image file path, a PIL image or a uint8 numpy array, got {type(image).__name__}.")


def read_image(path: Union[str, os.PathLike]) -> PIL.Image.Image:
  """Decodes the whole file now, so a truncated or corrupt file fails here, naming the file."""
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    raise IsADirectoryError(f"{path} is a directory; {_EXPECTED}.")
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; {_EXPECTED}.")
  try:
    image = PIL.Image.open(path)
  except PIL.UnidentifiedImageError:
    raise ValueError(f"{path} is not an image file Pillow can identify; {_EXPECTED}.") from None
  except PIL.Image.DecompressionBombError as e:
    raise ValueError(f"{path} is too large to decode safely: {e}") from None
  with image:
    try:
      image.load()
    except Exception as e:  # Pillow reports bad data as OSError, SyntaxError, ValueError or zlib errors
      raise ValueError(
        f"{path} is a truncated or corrupt {image.format} file: decoding failed ({type(e).__name__}: {e})."
      ) from None
    return to_rgb(image)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  """EXIF orientation applied, then 8-bit RGB (grayscale, palette, CMYK, RGBA: PIL's own conversions)."""
  from_png = image.format == "PNG"  # copies (as exif_transpose makes) forget the format
  image = PIL.ImageOps.exif_transpose(image)
  if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and from_png):
    # PNG stores at most 16 bits; the high byte is the 8-bit value (65535 -> 255, 257 * v -> v).
    values = np.asarray(image).astype(np.uint32)
    image = PIL.Image.fromarray((values >> 8).astype(np.uint8))
  elif image.mode in ("I", "F"):
    raise ValueError(
      f"{image.mode!r} images ({'32-bit integer' if image.mode == 'I' else 'floating point'} "
      "pixels) have no known value range; convert them to 8-bit first."
    )
  return image.convert("RGB")


def from_array(array: np.ndarray) -> PIL.Image.Image:
  if array.dtype != np.uint8:
    raise TypeError(
      f"Image arrays must be uint8 (0..255), got {array.dtype}; float arrays are ambiguous "
      "(0..1 or 0..255?), convert them first."
    )
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
    return PIL.Image.fromarray(np.ascontiguousarray(array))
  raise ValueError(
    f"Image arrays must be [H, W], [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA), got shape {array.shape}."
  )
