"""Settings shared by the pipeline tests and the multi-host worker, so both build the same pipelines."""

TRAIN_PP = "decode|inception_crop(16)|flip_lr|normalize('inception')|onehot(10, smoothing=0.1)"
EVAL_PP = "decode|resize(16)|normalize('inception')"
GLOBAL_BATCH = 64
SEED = 7
