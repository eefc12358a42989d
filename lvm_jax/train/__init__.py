"""Training: optimizer and schedules, train state, pure train/eval steps, the loop, checkpoints, metrics."""
