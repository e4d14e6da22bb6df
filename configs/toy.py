"""Toy config: an equilibrium RNN on synthetic regression data (problems/toy.py).

For testing the runner, checkpoints and sweeps in seconds; its numbers mean
nothing. Presets: ``quick`` (a few dozen steps), ``long`` (for kill/resume).
"""

import ml_collections

from configs.base import base_config, optimizer_config


def get_config(preset=None):
  c = base_config(batch_size=16, num_epochs=2, log_every_steps=4, checkpoint_every_steps=8)
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
  c.optimizer = optimizer_config(learning_rate=1e-2)
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
