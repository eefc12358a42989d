"""The input preprocessing a checkpoint was trained with, read from its own config files."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """size: final (height, width). resize_shorter: when set, resize the shorter side to this length (keeping
  the aspect ratio) and center-crop `size`; otherwise resize straight to `size`."""
  size: tuple[int, int] = (224, 224)
  resize_shorter: int | None = None
  interpolation: str = "bilinear"
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)

  @classmethod
  def from_hf(cls, path, model) -> "Preprocessing":
    return cls()

  @classmethod
  def from_timm(cls, config: dict) -> "Preprocessing":
    return cls()

  def to_hf(self) -> dict:
    return {}
