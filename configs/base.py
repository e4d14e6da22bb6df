"""Pieces shared by every experiment config (schema: docs/conventions.md).

An experiment's ``get_config`` starts from :func:`base_config` and sets only
what is specific to it (problem, solvers, optimizer, sizes, presets);
:func:`relaxation` / :func:`with_anderson` spell a fixed-point relaxation
(``bilevel.relaxation.relaxation_from_config``) and :func:`preset_tokens`
parses combined presets such as ``quick+anderson``.
"""

from typing import Optional, Sequence

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


def relaxation(rtol: float, max_steps: int, strategy: str = "euler", steps_per_check: int = 1,
               **strategy_options) -> dict:
  """A relaxation block; ``strategy_options`` default to ``dt = 1``."""
  return dict(strategy=strategy, strategy_options=strategy_options or {"dt": 1.0}, rtol=rtol,
              atol=0.0, max_steps=max_steps, steps_per_check=steps_per_check)


def with_anderson(relax: dict, memory: int = 5) -> dict:
  """The same relaxation (tolerances, budget) with Anderson acceleration."""
  return dict(relax, strategy="anderson", strategy_options=dict(
      dt=1.0, memory=memory, mixing=1.0, ridge=1e-6))


def preset_tokens(preset: Optional[str], valid: Sequence[str]) -> set:
  """``'quick+anderson'`` -> ``{'quick', 'anderson'}``; ValueError naming the valid ones."""
  tokens = {t for t in (preset or "").replace(",", "+").split("+") if t and t != "default"}
  unknown = tokens - set(valid)
  if unknown:
    raise ValueError(f"unknown preset(s) {sorted(unknown)}; valid presets: "
                     f"{', '.join(valid)} (combine with '+')")
  return tokens
