"""Reading images: every PIL mode a JPEG or PNG gives, EXIF orientation, arrays, and the errors for bad input."""

import struct
import zlib

import numpy as np
import PIL.Image
import pytest
import skimage.data

from lvm_jax.tasks import images

CHELSEA = skimage.data.chelsea()  # 300 x 451 x 3 uint8
CAMERA = skimage.data.camera()  # 512 x 512 uint8 grayscale


def _save(tmp_path, name, image, **kwargs):
  path = tmp_path / name
  image.save(path, **kwargs)
  return path


def _write_png16_rgb(path, array):
  """A 16-bit-per-channel RGB PNG, written by hand: Pillow cannot write this mode."""
  height, width, _ = array.shape
  raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
  path.write_bytes(
    b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
  )
  return path


def test_rgb_png_is_read_exactly(tmp_path):
  image = images.read_image(_save(tmp_path, "cat.png", PIL.Image.fromarray(CHELSEA)))
  assert image.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(image), CHELSEA)


def test_rgb_jpeg_is_decoded_as_pil_decodes_it(tmp_path):
  path = _save(tmp_path, "cat.jpg", PIL.Image.fromarray(CHELSEA), quality=90)
  image = images.read_image(str(path))
  assert (image.mode, image.size) == ("RGB", (451, 300))
  np.testing.assert_array_equal(np.asarray(image), np.asarray(PIL.Image.open(path)))
  assert np.abs(np.asarray(image).astype(int) - CHELSEA).mean() < 3  # a JPEG of the same photo


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
  image = np.asarray(images.read_image(_save(tmp_path, "gray.png", PIL.Image.fromarray(CAMERA))))
  assert image.shape == (512, 512, 3)
  for channel in range(3):
    np.testing.assert_array_equal(image[..., channel], CAMERA)


def test_palette_png_is_expanded_to_its_colours(tmp_path):
  palette_image = PIL.Image.fromarray(CHELSEA).quantize(colors=16)
  expected = np.asarray(palette_image.convert("RGB"))
  path = _save(tmp_path, "palette.png", palette_image)
  assert PIL.Image.open(path).mode == "P"
  np.testing.assert_array_equal(np.asarray(images.read_image(path)), expected)
  assert len(np.unique(expected.reshape(-1, 3), axis=0)) == 16


def test_rgba_png_drops_alpha_as_transformers_load_image_does(tmp_path):
  alpha = np.tile(np.linspace(0, 255, CHELSEA.shape[1]).astype(np.uint8), (CHELSEA.shape[0], 1))
  rgba = np.dstack([CHELSEA, alpha])
  image = images.read_image(_save(tmp_path, "rgba.png", PIL.Image.fromarray(rgba)))
  # PIL's convert("RGB") keeps the colour channels; compositing on white would change the transparent side.
  np.testing.assert_array_equal(np.asarray(image), CHELSEA)


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
  path = _save(tmp_path, "cmyk.jpg", PIL.Image.fromarray(CHELSEA).convert("CMYK"), quality=95)
  assert PIL.Image.open(path).mode == "CMYK"
  image = np.asarray(images.read_image(path))
  assert image.shape == CHELSEA.shape
  np.testing.assert_array_equal(image, np.asarray(PIL.Image.open(path).convert("RGB")))
  assert np.abs(image.astype(int) - CHELSEA).mean() < 4  # the same photo, not inverted or channel-swapped


def test_16_bit_grayscale_png_is_scaled_to_8_bits(tmp_path):
  path = _save(tmp_path, "gray16.png", PIL.Image.fromarray(CAMERA.astype(np.uint16) * 257))
  assert PIL.Image.open(path).mode.startswith("I")
  image = np.asarray(images.read_image(path))
  np.testing.assert_array_equal(image[..., 0], CAMERA)  # 257 * v -> v, not saturated to 255
  np.testing.assert_array_equal(image[..., 2], CAMERA)


def test_16_bit_rgb_png_keeps_the_high_byte(tmp_path):
  values = np.random.RandomState(0).randint(0, 65536, (20, 30, 3)).astype(np.uint16)
  image = images.read_image(_write_png16_rgb(tmp_path / "rgb16.png", values))
  np.testing.assert_array_equal(np.asarray(image), (values >> 8).astype(np.uint8))


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_exif_orientation_is_applied(tmp_path, ext):
  crop = CHELSEA[:40, :60]
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  path = _save(tmp_path, f"rotated.{ext}", PIL.Image.fromarray(crop), exif=exif)
  image = images.read_image(path)
  assert image.size == (40, 60)  # width, height swapped
  if ext == "png":  # lossless: the exact rotation
    np.testing.assert_array_equal(np.asarray(image), np.rot90(crop, k=-1))


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.jpg does not exist; expected an image file"):
    images.read_image(tmp_path / "nope.jpg")


def test_directory_is_a_clear_error(tmp_path):
  with pytest.raises(IsADirectoryError, match="is a directory; expected an image file"):
    images.read_image(tmp_path)


@pytest.mark.parametrize("content", [b"name,label\ncat,1\n", b""], ids=["text", "empty"])
def test_non_image_file_is_a_clear_error(tmp_path, content):
  path = tmp_path / "labels.jpg"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=r"labels\.jpg is not an image file Pillow can identify"):
    images.read_image(path)


@pytest.mark.parametrize("ext,fmt", [("jpg", "JPEG"), ("png", "PNG")])
def test_truncated_file_is_a_clear_error(tmp_path, ext, fmt):
  whole = _save(tmp_path, f"whole.{ext}", PIL.Image.fromarray(CHELSEA)).read_bytes()
  path = tmp_path / f"cut.{ext}"
  path.write_bytes(whole[: len(whole) // 2])
  with pytest.raises(ValueError, match=rf"cut\.{ext} is a truncated or corrupt {fmt} file"):
    images.read_image(path)


def test_arrays_of_every_supported_shape():
  gray = CAMERA[:50, :70]
  for array in (gray, gray[..., None]):
    np.testing.assert_array_equal(np.asarray(images.load_image(array)), np.dstack([gray] * 3))
  np.testing.assert_array_equal(np.asarray(images.load_image(CHELSEA)), CHELSEA)
  rgba = np.dstack([CHELSEA, np.zeros(CHELSEA.shape[:2], np.uint8)])
  np.testing.assert_array_equal(np.asarray(images.load_image(rgba)), CHELSEA)


def test_bad_arrays_are_clear_errors():
  with pytest.raises(TypeError, match="must be uint8"):
    images.load_image(CHELSEA.astype(np.float32) / 255)
  with pytest.raises(ValueError, match=r"got shape \(4, 5, 2\)"):
    images.load_image(np.zeros((4, 5, 2), np.uint8))
  with pytest.raises(TypeError, match="got int"):
    images.load_image(3)


def test_pil_images_are_converted_like_files():
  assert images.load_image(PIL.Image.fromarray(CAMERA)).mode == "RGB"
  sixteen = PIL.Image.fromarray(CAMERA.astype(np.uint16) * 257)
  np.testing.assert_array_equal(np.asarray(images.load_image(sixteen))[..., 1], CAMERA)
  with pytest.raises(ValueError, match="floating point"):
    images.load_image(PIL.Image.fromarray(CAMERA.astype(np.float32)))
