"""Run-level defaults shared by every experiment config (docs/conventions.md).

An experiment's ``get_config`` starts from :func:`base_config` and sets only
what is specific to it (problem, solvers, optimizer, sizes, presets).
"""

import ml_collections


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
  """The ``optimizer`` block: Adam at 1e-3 with no schedule unless overridden."""
  c = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, schedule="constant", final_lr_fraction=0.0,
      decay_every_epochs=1, decay_factor=0.5, clip_norm=0.0, weight_decay=0.0,
      polyak_start_epoch=-1, polyak_decay=0.0))
  c.update(overrides)
  return c


def base_config(**overrides) -> ml_collections.ConfigDict:
  """Every top-level key of the schema with a neutral default."""
  c = ml_collections.ConfigDict()
  c.problem = ""
  c.problem_options = ml_collections.ConfigDict()
  c.solver = ""
  c.solvers = ml_collections.ConfigDict()
  c.optimizer = optimizer_config()
  c.batch_size = 64
  c.num_epochs = 1
  c.num_steps = 0
  c.seed = 0
  c.data_dir = ""
  c.num_devices = 0
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.on_nonfinite = "stop"
  c.max_nonconverged_fraction = 1.0
  c.update(overrides)
  return c
