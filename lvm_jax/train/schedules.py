"""Learning-rate schedules: linear warmup from 0 to the peak, then cosine, linear, constant or step decay.

Steps count optimizer updates (not micro-batches when gradients are accumulated).
"""

import jax.numpy as jnp

DECAYS = ("cosine", "linear", "constant", "steps")


def warmup_then_decay(
  peak_lr: float,
  *,
  warmup_steps: int,
  total_steps: int,
  decay: str = "cosine",
  end_lr_fraction: float = 0.0,
  boundaries: tuple = (),
  factor: float = 0.1,
):
  """lr(step): peak*step/warmup for step < warmup, then decays to peak*end_lr_fraction at total_steps; or, with
  decay="steps", is multiplied by `factor` at each of `boundaries` (fractions of total_steps), as torchvision's
  detection recipes' MultiStepLR (e.g. epochs 16 and 22 of 26).

  Held at the end value after total_steps (a resumed run that overshoots must not restart the cosine).
  """
  if decay not in DECAYS:
    raise ValueError(f"optimizer.schedule.decay={decay!r} is not one of {DECAYS}.")
  if not isinstance(warmup_steps, int) or warmup_steps < 0:
    raise ValueError(f"optimizer.schedule.warmup_steps must be an int >= 0, got {warmup_steps!r}.")
  if not 0.0 <= end_lr_fraction <= 1.0:
    raise ValueError(f"optimizer.schedule.end_lr_fraction must be in [0, 1], got {end_lr_fraction!r}.")
  if decay != "constant" and (not isinstance(total_steps, int) or total_steps <= warmup_steps):
    raise ValueError(
      f"optimizer.schedule.total_steps={total_steps!r} must be an int > warmup_steps={warmup_steps} "
      f"for decay={decay!r}."
    )
  end_lr = peak_lr * end_lr_fraction
  boundaries = tuple(boundaries or ())
  if decay == "steps" and (not boundaries or not all(0.0 < b < 1.0 for b in boundaries)):
    raise ValueError(
      f"optimizer.schedule.boundaries={boundaries!r}: decay='steps' needs fractions of the run in (0, 1), "
      "e.g. (16 / 26, 22 / 26)."
    )

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * step / max(warmup_steps, 1)
    if decay == "constant":
      after = jnp.full_like(step, peak_lr)
    elif decay == "steps":
      passed = sum((step >= round(b * total_steps)).astype(jnp.float32) for b in boundaries)
      after = peak_lr * factor**passed
    else:
      t = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
      if decay == "cosine":
        after = end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
      else:
        after = peak_lr + (end_lr - peak_lr) * t
    return jnp.where(step < warmup_steps, warm, after)

  return schedule
