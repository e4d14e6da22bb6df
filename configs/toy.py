"""Toy config: an equilibrium RNN on synthetic regression data (problems/toy.py).

For testing the runner, checkpoints and sweeps in seconds; its numbers mean
nothing. Presets: ``quick`` (a few dozen steps), ``long`` (for kill/resume).
"""

import ml_collections


def get_config(preset=None):
  c = ml_collections.ConfigDict()
  c.problem = "toy"
  c.problem_options = ml_collections.ConfigDict(dict(
      n_hidden=16, n_in=4, n_out=2, n_train=256, n_test=256, data_seed=0, init_gain=0.5,
      nan_batch_steps=()))
  c.solver = "lcp_di"
  c.solvers = ml_collections.ConfigDict()
  # Anderson on the controlled phase: plain Euler(dt=1) diverges on this toy.
  controlled = dict(strategy="anderson", strategy_options=dict(dt=1.0), rtol=1e-4,
                    max_steps=400)
  c.solvers.lcp_di = ml_collections.ConfigDict(dict(alpha=0.1, controlled=controlled))
  c.solvers.lcp_kp = ml_collections.ConfigDict(dict(alpha=0.1, controlled=controlled))
  c.solvers.rbp = ml_collections.ConfigDict(dict(adjoint=dict(rtol=1e-5, max_steps=200)))
  c.solvers.bp = ml_collections.ConfigDict(dict(num_steps=60))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-2, schedule="constant", final_lr_fraction=0.0,
      decay_every_epochs=1, decay_factor=0.5, clip_norm=0.0, weight_decay=0.0,
      polyak_start_epoch=-1, polyak_decay=0.0))
  c.batch_size = 16
  c.num_epochs = 2
  c.num_steps = 0
  c.seed = 0
  c.data_dir = ""
  c.num_devices = 0
  c.log_every_steps = 4
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 8
  c.keep_checkpoints = 3
  c.on_nonfinite = "stop"
  c.max_nonconverged_fraction = 1.0

  if preset in (None, "", "default"):
    pass
  elif preset == "quick":
    c.num_epochs = 1
  elif preset == "long":
    c.num_steps = 400
    c.log_every_steps = 10
    c.checkpoint_every_steps = 10
    c.eval_every_epochs = 0
  else:
    raise ValueError(f"unknown preset {preset!r}; valid presets: quick, long")
  return c
