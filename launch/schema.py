"""Validation of a loaded config against the one schema in ``configs/base.py``.

:func:`validate` raises one :class:`ConfigError` line naming the fix, *before*
anything is compiled: unknown or missing keys, wrong types, out-of-range values
(types and ranges from ``configs.base.SCHEMA`` / ``OPTIMIZER_SCHEMA``), unknown
problem, solver or optimizer names, and solver options (by building the solver).
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import optax

import problems
import solvers
from configs import base


class ConfigError(ValueError):
  """A config cannot be loaded or is invalid; the message names the fix."""


def to_dict(node: Any) -> Any:
  """ConfigDict/dict -> plain dict (recursively); tuples stay tuples."""
  if isinstance(node, ml_collections.ConfigDict):
    node = node.to_dict()
  if isinstance(node, dict):
    return {k: to_dict(v) for k, v in node.items()}
  return node


def solver_options(config: Any) -> dict:
  """The options passed to ``solvers.get_solver(config.solver, **options)``."""
  opts = (config.get("solvers", None) or {}).get(config.solver, None)
  return to_dict(opts) if opts is not None else {}


def optimizer_config(config: Any) -> dict:
  """``config.optimizer`` with the schema's defaults (configs/base.py) filled in."""
  out = dict(to_dict(base.optimizer_config()), **base.OPTIONAL_OPTIMIZER)
  out.update(to_dict(config.optimizer))
  return out


def _type_name(types: tuple) -> str:
  names = {int: "int", float: "float", str: "str", bool: "bool", type(None): "None",
           ml_collections.ConfigDict: "ConfigDict", dict: "dict"}
  return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def check_value(key: str, value: Any, types: tuple, check, rng: str) -> None:
  """ConfigError unless ``value`` has one of ``types`` and passes ``check``."""
  ok_type = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
  if not ok_type:
    raise ConfigError(f"config.{key} must be {_type_name(types)}, got {value!r} "
                      f"({type(value).__name__}); set e.g. --config.{key}=VALUE with a "
                      f"{_type_name(types)}")
  if check is not None:
    if not check(value) or (isinstance(value, float) and not math.isfinite(value)):
      raise ConfigError(f"config.{key} = {value!r} is out of range; it must be {rng}")


def _validate_keys(config: Any) -> None:
  keys = set(config.keys())
  unknown = sorted(keys - set(base.SCHEMA))
  if unknown:
    raise ConfigError(f"unknown config key 'config.{unknown[0]}'; valid keys: "
                      f"{', '.join(sorted(base.SCHEMA))}")
  missing = sorted(set(base.SCHEMA) - keys)
  if missing:
    raise ConfigError(f"the config lacks key(s) {', '.join(missing)}; every config sets "
                      "all top-level keys (start from configs.base.base_config())")
  for key, (types, check, rng) in base.SCHEMA.items():
    check_value(key, config[key], types, check, rng)


def _validate_optimizer(config: Any) -> None:
  opt = to_dict(config.optimizer)
  bad = sorted(set(opt) - set(base.OPTIMIZER_SCHEMA))
  if bad:
    raise ConfigError(f"unknown config key 'config.optimizer.{bad[0]}'; valid keys: "
                      + ", ".join(f"config.optimizer.{k}" for k in sorted(base.OPTIMIZER_SCHEMA)))
  for key, value in opt.items():
    if value is None and key in base.OPTIONAL_OPTIMIZER:
      continue
    check_value(f"optimizer.{key}", value, *base.OPTIMIZER_SCHEMA[key])
  name = opt.get("name", "adam")
  if not callable(getattr(optax, name, None)) or name.startswith("_"):
    raise ConfigError(f"config.optimizer.name = {name!r} is not an optax optimizer; use "
                      "e.g. 'adam', 'adamw', 'sgd', 'rmsprop' or 'lamb'")


def _validate_names(config: Any) -> None:
  if config.problem not in problems.REGISTRY:
    raise ConfigError(f"unknown problem {config.problem!r}; valid problems: "
                      f"{', '.join(sorted(problems.REGISTRY)) or '(none registered)'} "
                      "(set --config.problem=NAME)")
  if config.solver not in solvers.REGISTRY:
    raise ConfigError(f"unknown solver {config.solver!r}; valid solvers: "
                      f"{', '.join(sorted(solvers.REGISTRY))} (set --config.solver=NAME)")
  for name, opts in to_dict(config.solvers).items():
    if name not in solvers.REGISTRY:
      raise ConfigError(f"config.solvers.{name} names no solver; valid solvers: "
                        f"{', '.join(sorted(solvers.REGISTRY))}")
    if opts is not None and not isinstance(opts, dict):
      raise ConfigError(f"config.solvers.{name} must be a group of options, got {opts!r}")


# What a problem offers beyond `dynamics`, and what a solver needs of it. Declared
# here so that a mismatch is found at config time without building the problem
# (and loading its data); tests/test_config.py::test_declared_capabilities_are_the_real_ones
# checks both tables against solver.init on the real problems, and that every
# registered problem is listed. energy: the problem has an inner `energy`;
# fast_weights: its state is a copy of the (slow) parameters (meta-learning);
# feedback: it exposes `feedback_units` and `feedback_modulation`.
PROBLEM_OFFERS: dict[str, set] = {
    "toy": set(), "mnist_ff": {"feedback"}, "mnist_rnn": {"feedback"},
    "omniglot": {"energy", "fast_weights"}, "cifar10_ff": set(), "cifar10_deq": set(),
    "inr": set()}
SOLVER_NEEDS: dict[str, set] = {
    "cml": {"energy"}, "imaml": {"energy"}, "fomaml": {"fast_weights"},
    "reptile": {"fast_weights"}, "lcp_lf": {"feedback"}}
_OFFER_NAMES = {"energy": "an inner energy (problem.has_energy)",
                "fast_weights": "a state that is a copy of the parameters (meta-learning)",
                "feedback": "the feedback hooks feedback_units / feedback_modulation"}


def solver_needs(config: Any) -> set:
  """What ``config.solver`` with its options needs of the problem."""
  needs = set(SOLVER_NEEDS.get(config.solver, ()))
  if solver_options(config).get("adjoint_method") == "cg":
    needs.add("energy")
  return needs


def _validate_compatibility(config: Any) -> None:
  offers = PROBLEM_OFFERS.get(config.problem)
  if offers is None:  # a problem not declared here: solver.init checks at run time
    return
  missing = sorted(solver_needs(config) - offers)
  if missing:
    able = sorted(name for name in solvers.REGISTRY
                  if not SOLVER_NEEDS.get(name, set()) - offers)
    raise ConfigError(f"solver {config.solver!r} needs {_OFFER_NAMES[missing[0]]}, which "
                      f"problem {config.problem!r} does not have; use one of: "
                      f"{', '.join(able)} (--config.solver=NAME)")


def _walk(tree: Any, prefix: str):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _walk(v, f"{prefix}.{k}")
  else:
    yield prefix, tree


def _validate_solver_values(config: Any) -> None:
  """alpha = 0 and max_steps = 0 are accepted by the solvers but never meaningful in a
  run: rejected here with the reason."""
  for key, value in _walk(solver_options(config), f"solvers.{config.solver}"):
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "alpha" and isinstance(value, (int, float)) and value == 0:
      raise ConfigError(
          f"config.{key} = 0: pure integral control settles only where grad L(y) = 0 "
          "exactly (never with cross-entropy), and settings derived from alpha (k_i = "
          "1/alpha, EBD's beta = 1/alpha) become infinite; use a small alpha > 0 (e.g. 1e-3)")
    if leaf in ("max_steps", "num_steps") and isinstance(value, int) and value == 0:
      raise ConfigError(
          f"config.{key} = 0 runs no iteration: the 'equilibrium' would be the initial "
          "state and the gradient meaningless; use >= 1")


def validate(config: Any, *, check_solver: bool = True) -> None:
  """Raises :class:`ConfigError` (one line, naming the fix) if ``config`` is invalid."""
  _validate_keys(config)
  _validate_optimizer(config)
  _validate_names(config)
  _validate_compatibility(config)
  _validate_solver_values(config)
  if check_solver:
    build_solver(config)


def build_solver(config: Any):
  """``solvers.get_solver(config.solver, **solver_options(config))``; ConfigError on bad options."""
  try:
    return solvers.get_solver(config.solver, **solver_options(config))
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.solvers.{config.solver}: {e}") from e


__all__ = ["PROBLEM_OFFERS", "SOLVER_NEEDS", "ConfigError", "build_solver", "check_value", "optimizer_config", "solver_options",
           "to_dict", "validate"]
