"""The FPN: torch's nearest-neighbour choice of rows at odd sizes, the top-down sums, P6/P7's sources and sizes."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.tasks.detection import fpn
from tests.tasks.detection.test_heads import param_shapes

DETECTORS = Path(__file__).resolve().parents[2] / "fixtures" / "torchvision" / "detectors"


def torch_nearest_indices() -> dict[tuple[int, int], list[int]]:
  """Rows torch's F.interpolate(mode="nearest", size=out) read, recorded by make_detector_fixtures.py."""
  table = json.loads((DETECTORS / "MANIFEST.json").read_text())["nearest_indices"]
  return {tuple(int(n) for n in key.split("->")): rows for key, rows in table.items()}


def test_nearest_indices_are_torchs():
  table = torch_nearest_indices()
  assert (4, 7) in table and (3, 8) in table  # odd targets, and a factor that is not 2
  for (size_in, size_out), rows in table.items():
    np.testing.assert_array_equal(fpn.nearest_indices(size_in, size_out), rows, err_msg=f"{size_in}->{size_out}")


@pytest.mark.parametrize("size_in, size_out", [((2, 3), (3, 5)), ((4, 6), (7, 11)), ((3, 5), (8, 3))])
def test_upsample_nearest_reads_torchs_rows_and_columns(size_in, size_out):
  table = torch_nearest_indices()
  h, w = size_in
  # Each pixel holds its own coordinates, so the result shows which source pixel every output pixel read.
  grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), axis=-1).astype(np.float32)
  x = np.broadcast_to(grid, (2, h, w, 2))
  out = np.asarray(fpn.upsample_nearest(jnp.asarray(x), size_out))
  rows, cols = table[(h, size_out[0])], table[(w, size_out[1])]
  assert out.shape == (2, *size_out, 2)
  np.testing.assert_array_equal(out[0, :, 0, 0], rows)
  np.testing.assert_array_equal(out[1, 0, :, 1], cols)


def identity_pyramid_params(channels: int) -> dict:
  """Laterals and output convolutions that pass their input through unchanged (1x1 identity, a centred 3x3
  delta, zero biases), so the pyramid computes the bare top-down sums; P6 and P7 zero."""
  eye, zeros = np.eye(channels, dtype=np.float32), np.zeros(channels, np.float32)
  delta = np.zeros((3, 3, channels, channels), np.float32)
  delta[1, 1] = eye
  params = {
    "p6": {"kernel": np.zeros_like(delta), "bias": zeros},
    "p7": {"kernel": np.zeros_like(delta), "bias": zeros},
  }
  for i in range(3):
    params[f"lateral_{i}"] = {"kernel": eye[None, None], "bias": zeros}
    params[f"output_{i}"] = {"kernel": delta, "bias": zeros}
  return params


def test_top_down_sums_upsampled_coarser_levels():
  channels = 4
  rng = np.random.default_rng(0)
  c3, c4, c5 = (rng.standard_normal((1, h, w, channels)).astype(np.float32) for h, w in ((7, 11), (4, 6), (2, 3)))
  model = fpn.FeaturePyramid(channels)
  p3, p4, p5, _, _ = jax.jit(model.apply)({"params": identity_pyramid_params(channels)}, [c3, c4, c5])
  up = lambda x, h, w: x[:, fpn.nearest_indices(x.shape[1], h)][:, :, fpn.nearest_indices(x.shape[2], w)]
  np.testing.assert_allclose(p5, c5, atol=1e-6)
  np.testing.assert_allclose(p4, c4 + up(c5, 4, 6), atol=1e-6)
  np.testing.assert_allclose(p3, c3 + up(c4 + up(c5, 4, 6), 7, 11), atol=1e-6)


@pytest.mark.parametrize("extra_from, p6_inputs", [("p5", 8), ("c5", 24)])
def test_p6_p7_source_and_sizes(extra_from, p6_inputs):
  rng = np.random.default_rng(1)
  features = [rng.standard_normal((2, h, w, c)).astype(np.float32) for h, w, c in ((9, 13, 6), (5, 7, 12), (3, 4, 24))]
  model = fpn.FeaturePyramid(8, extra_from=extra_from)
  # P6 reads P5 (256 channels in torchvision's v1 and FCOS) or C5 (2048 in v2).
  assert param_shapes(model, features)["p6"]["kernel"].shape == (3, 3, p6_inputs, 8)
  outputs = jax.eval_shape(model.init_with_output, jax.random.key(0), features)[0]
  # Stride-2 3x3 convolutions with padding 1 give ceil(n / 2).
  assert [o.shape for o in outputs] == [(2, 9, 13, 8), (2, 5, 7, 8), (2, 3, 4, 8), (2, 2, 2, 8), (2, 1, 1, 8)]


def test_bad_arguments_are_named():
  features = [jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 2, 2, 8)), jnp.zeros((1, 1, 1, 8))]
  with pytest.raises(ValueError, match="extra_from"):
    fpn.FeaturePyramid(8, extra_from="c6").init(jax.random.key(0), features)
  with pytest.raises(ValueError, match="got 2 maps"):
    fpn.FeaturePyramid(8).init(jax.random.key(0), features[:2])
