"""The one config schema, and pieces shared by every experiment config.

:func:`base_config` / :func:`optimizer_config` hold every key with its default;
:data:`SCHEMA` / :data:`OPTIMIZER_SCHEMA` hold each key's type and valid range
(read by ``launch/validation.py``; keys documented in docs/conventions.md);
:data:`OPTIONAL_OPTIMIZER` are the optimizer keys a config may add (default
when absent). An experiment's ``get_config`` starts from :func:`base_config` and sets only
what is specific to it (problem, solvers, optimizer, sizes, presets);
:func:`relaxation` / :func:`with_anderson` spell a fixed-point relaxation
(``bilevel.relaxation.relaxation_from_config``) and :func:`preset_tokens`
parses combined presets such as ``quick+anderson``.
"""

from typing import Optional, Sequence

import ml_collections

_INT = (int,)
_NUM = (int, float)
_GROUP = (ml_collections.ConfigDict, dict)

# key -> (types, check or None, description of the valid range). Defaults: base_config().
SCHEMA: dict = {
    "problem": ((str,), None, "a key of problems.REGISTRY"),
    "problem_options": (_GROUP, None, "a ConfigDict"),
    "solver": ((str,), None, "a key of solvers.REGISTRY"),
    "solvers": (_GROUP, None, "a ConfigDict"),
    "optimizer": (_GROUP, None, "a ConfigDict"),
    "batch_size": (_INT, lambda v: v > 0, "> 0"),
    "num_epochs": (_INT, lambda v: v >= 0, ">= 0"),
    "num_steps": (_INT, lambda v: v >= 0, ">= 0 (0 = num_epochs * steps_per_epoch)"),
    "seed": (_INT, lambda v: v >= 0, ">= 0"),
    "data_dir": ((str,), None, "a path or ''"),
    "num_devices": (_INT, lambda v: v >= 0, ">= 0 (0 = all local devices)"),
    "log_every_steps": (_INT, lambda v: v > 0, "> 0"),
    "eval_every_epochs": (_INT, lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    "checkpoint_every_steps": (_INT, lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    "checkpoint_every_minutes": (_NUM, lambda v: v >= 0, ">= 0 (0 = by steps only)"),
    "keep_checkpoints": (_INT, lambda v: v >= 1, ">= 1"),
    "on_nonfinite": ((str,), lambda v: v in ("stop", "skip"), "'stop' or 'skip'"),
    "max_nonconverged_fraction": (_NUM, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "max_loss_growth": (_NUM, lambda v: v == 0 or v > 1, "> 1, or 0 (off)"),
    "on_invalid_examples": ((str,), lambda v: v in ("drop", "keep", "stop"),
                            "'drop', 'keep' or 'stop'"),
}

# optimizer key -> (types, check, range). Defaults: optimizer_config() and OPTIONAL_OPTIMIZER.
OPTIMIZER_SCHEMA: dict = {
    "name": ((str,), None, "an optax optimizer name such as 'adam' or 'sgd'"),
    "learning_rate": (_NUM, lambda v: v > 0, "> 0"),
    "schedule": ((str,), lambda v: v in ("constant", "cosine", "step"),
                 "'constant', 'cosine' or 'step'"),
    "final_lr_fraction": (_NUM, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "decay_every_epochs": (_INT, lambda v: v > 0, "> 0"),
    "decay_factor": (_NUM, lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "clip_norm": (_NUM, lambda v: v >= 0, ">= 0 (0 = off)"),
    # "joint": one global norm over (params, solver_params); "separate": each
    # clipped to clip_norm on its own (the paper authors' two clips).
    "clip_groups": ((str,), lambda v: v in ("joint", "separate"), "'joint' or 'separate'"),
    "weight_decay": (_NUM, lambda v: v >= 0, ">= 0"),
    "polyak_start_epoch": (_INT, lambda v: v >= -1, ">= -1 (-1 = off)"),
    "polyak_decay": (_NUM, lambda v: 0.0 <= v < 1.0,
                     "in [0, 1) (0 = uniform Polyak average, else EMA decay)"),
    # Optional extras, passed to the optax constructor when it accepts them.
    "momentum": ((int, float, type(None)), None, "a float or None"),
    "nesterov": ((bool,), None, "true/false"),
    "options": ((ml_collections.ConfigDict, dict, type(None)), None,
                "a ConfigDict of extra optax keyword arguments"),
}
# Optimizer keys a config may omit (their value when omitted); may be None.
OPTIONAL_OPTIMIZER = {"momentum": None, "nesterov": False, "options": None,
                      "clip_groups": "joint"}


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
  # Also save when this many minutes passed since the last checkpoint (0 = off).
  c.checkpoint_every_minutes = 5.0
  c.keep_checkpoints = 3
  c.on_nonfinite = "stop"
  # Stop ("diverged") when a phase's fixed point did not converge for more than this
  # fraction of the examples over a logging window (1.0 = never). Configs whose
  # relaxations run a fixed budget by design set 1.0.
  c.max_nonconverged_fraction = 0.5
  # Stop ("diverged") when the logged training loss exceeds this many times its lowest
  # logged value (0 = off).
  c.max_loss_growth = 1000.0
  # Examples (tasks) whose relaxation diverged: 'drop' them from the batch mean,
  # 'keep' them, or 'stop' the run (bilevel.train.make_train_step(invalid_examples=)).
  c.on_invalid_examples = "drop"
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
