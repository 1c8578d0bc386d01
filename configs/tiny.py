"""A seconds-long run for tests and smoke checks: a tiny model folder given with --config.model.path."""

from ift_jax.configs.default import get_config as _default


def get_config():
  c = _default()
  c.model.path = ""  # required: a tiny Hugging Face folder
  c.model.compute_dtype = "float32"
  c.data.seq_len = 64
  c.data.holdout_templates = ""  # the default holds out a catalog template; tests bring their own data
  c.data.max_eval_examples = 8
  c.train.batch_size = 8
  c.train.steps = 6
  c.train.eval_every = 3
  c.train.eval_batch_size = 8
  c.optim.warmup_steps = 1
  c.checkpoint.every = 2
  return c
