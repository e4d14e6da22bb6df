"""Experiment configs: load ``configs/NAME.py``, apply a preset and overrides, validate.

A config file defines ``get_config(preset: str | None = None) ->
ml_collections.ConfigDict`` following the schema of ``docs/conventions.md``.
From the command line::

    --config NAME[:preset]          # configs/NAME.py, or a path to a .py file
    --config.optimizer.learning_rate=3e-4 --config.solvers.lcp_di.alpha 0.05

Override values are parsed by the type of the field they replace (bool, int,
float, str, tuple); keys under ``solvers.<name>`` that the file does not set may
be added (they are checked by building the solver). Everything is validated by
:func:`validate` *before* anything is compiled: unknown keys, wrong types,
out-of-range values and unknown solver/problem names raise one
:class:`ConfigError` whose message says what to do.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import ml_collections

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
  """A config cannot be loaded or is invalid; the message names the fix."""


# ----- schema (docs/conventions.md) -------------------------------------------

# key -> (types, check, description of the valid range)
_INT = (int,)
_NUM = (int, float)
TOP_LEVEL: dict[str, tuple] = {
    "problem": ((str,), None, "a key of problems.REGISTRY"),
    "problem_options": ((ml_collections.ConfigDict, dict), None, "a ConfigDict"),
    "solver": ((str,), None, "a key of solvers.REGISTRY"),
    "solvers": ((ml_collections.ConfigDict, dict), None, "a ConfigDict"),
    "optimizer": ((ml_collections.ConfigDict, dict), None, "a ConfigDict"),
    "batch_size": (_INT, lambda v: v > 0, "> 0"),
    "num_epochs": (_INT, lambda v: v >= 0, ">= 0"),
    "num_steps": (_INT, lambda v: v >= 0, ">= 0 (0 = num_epochs * steps_per_epoch)"),
    "seed": (_INT, lambda v: v >= 0, ">= 0"),
    "data_dir": ((str,), None, "a path or ''"),
    "num_devices": (_INT, lambda v: v >= 0, ">= 0 (0 = all local devices)"),
    "log_every_steps": (_INT, lambda v: v > 0, "> 0"),
    "eval_every_epochs": (_INT, lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    "checkpoint_every_steps": (_INT, lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    "keep_checkpoints": (_INT, lambda v: v >= 1, ">= 1"),
    "on_nonfinite": ((str,), lambda v: v in ("stop", "skip"), "'stop' or 'skip'"),
    "max_nonconverged_fraction": (_NUM, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
}

# optimizer sub-keys: (types, check, range, default used when the file omits it)
OPTIMIZER: dict[str, tuple] = {
    "name": ((str,), None, "an optax optimizer name such as 'adam' or 'sgd'", "adam"),
    "learning_rate": (_NUM, lambda v: v > 0, "> 0", 1e-3),
    "schedule": ((str,), lambda v: v in ("constant", "cosine", "step"),
                 "'constant', 'cosine' or 'step'", "constant"),
    "final_lr_fraction": (_NUM, lambda v: 0.0 <= v <= 1.0, "in [0, 1]", 0.0),
    "decay_every_epochs": (_INT, lambda v: v > 0, "> 0", 1),
    "decay_factor": (_NUM, lambda v: 0.0 < v <= 1.0, "in (0, 1]", 0.1),
    "clip_norm": (_NUM, lambda v: v >= 0, ">= 0 (0 = off)", 0.0),
    # "joint": one global norm over (params, solver_params); "separate": each
    # clipped to clip_norm on its own (the paper authors' two clips).
    "clip_groups": ((str,), lambda v: v in ("joint", "separate"), "'joint' or 'separate'",
                    "joint"),
    "weight_decay": (_NUM, lambda v: v >= 0, ">= 0", 0.0),
    "polyak_start_epoch": (_INT, lambda v: v >= -1, ">= -1 (-1 = off)", -1),
    "polyak_decay": (_NUM, lambda v: 0.0 <= v < 1.0,
                     "in [0, 1) (0 = uniform Polyak average, else EMA decay)", 0.0),
    # Optional extras, passed to the optax constructor when it accepts them.
    "momentum": ((int, float, type(None)), None, "a float or None", None),
    "nesterov": ((bool,), None, "true/false", False),
    "options": ((ml_collections.ConfigDict, dict), None,
                "a ConfigDict of extra optax keyword arguments", None),
}
_OPTIONAL_OPTIMIZER_KEYS = {"momentum", "nesterov", "options"}


# ----- loading ------------------------------------------------------------------

def split_spec(spec: str) -> tuple[str, Optional[str]]:
  """``'NAME:preset'`` -> ``('NAME', 'preset')``; ``'NAME'`` -> ``('NAME', None)``."""
  if ":" in spec and not (len(spec) > 1 and spec[1] == ":" and spec[0].isalpha()
                          and spec.count(":") == 1):  # a Windows drive letter
    name, preset = spec.rsplit(":", 1)
    return name, (preset or None)
  return spec, None


def available_configs() -> list[str]:
  """Names of the config files in ``configs/`` (files defining ``get_config``)."""
  out = []
  for p in sorted(CONFIG_DIR.glob("*.py")):
    try:
      if not p.stem.startswith("_") and "def get_config" in p.read_text():
        out.append(p.stem)
    except OSError:
      continue
  return out


def config_path(name: str) -> Path:
  """Resolves a config name (``mnist_rnn``) or a path (``configs/x.py``) to a file."""
  available = available_configs()
  if name.endswith(".py") or os.sep in name or "/" in name:
    path = Path(name)
    if not path.is_file():
      raise ConfigError(f"config file {name!r} does not exist; give a path to a .py file "
                        f"or one of the names: {', '.join(available) or '(none)'}")
    return path
  path = CONFIG_DIR / f"{name}.py"
  if not path.is_file():
    raise ConfigError(f"unknown config {name!r}; valid configs are: "
                      f"{', '.join(available) or '(none in ' + str(CONFIG_DIR) + ')'} "
                      "(or pass a path to a .py file)")
  return path


def load_config_file(name: str, preset: Optional[str] = None) -> ml_collections.ConfigDict:
  """Imports the config file and calls ``get_config(preset)``."""
  path = config_path(name)
  spec = importlib.util.spec_from_file_location(f"_bilevel_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 -- user code; reported in one line
    raise ConfigError(f"config file {path} failed to import: {type(e).__name__}: {e}; "
                      "fix the file") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config(preset=None); add one")
  fn = module.get_config
  try:
    n_params = len(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    n_params = 1
  try:
    if preset is None:
      config = fn()
    elif n_params == 0:
      raise ConfigError(f"config {path.stem!r} has no presets (get_config takes no "
                        f"argument); drop ':{preset}'")
    else:
      config = fn(preset)
  except ConfigError:
    raise
  except (ValueError, KeyError) as e:
    msg = e.args[0] if e.args else str(e)
    raise ConfigError(f"config {path.stem!r} rejected preset {preset!r}: {msg}") from e
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict, "
                      f"got {type(config).__name__}")
  return config


# ----- overrides ----------------------------------------------------------------

def parse_override_args(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """Extracts ``--config.a.b=v`` / ``--config.a.b v`` pairs; returns (pairs, rest)."""
  pairs, rest = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" in body:
        key, value = body.split("=", 1)
      else:
        if i + 1 >= len(argv):
          raise ConfigError(f"override {arg} has no value; write {arg}=VALUE")
        key, value = body, argv[i + 1]
        i += 1
      pairs.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return pairs, rest


def _parse_bool(text: str) -> bool:
  low = text.strip().lower()
  if low in ("1", "true", "yes", "on", "t", "y"):
    return True
  if low in ("0", "false", "no", "off", "f", "n"):
    return False
  raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_value(text: str, like: Any) -> Any:
  """Parses ``text`` into the type of the current value ``like``."""
  if isinstance(like, bool):
    return _parse_bool(text)
  if isinstance(like, int):
    value = _literal(text)
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
      raise ValueError(f"{text!r} is not an integer")
    return value
  if isinstance(like, float):
    value = _literal(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"{text!r} is not a number")
    return float(value)
  if isinstance(like, str):
    return text
  if isinstance(like, (tuple, list)):
    value = _literal(text)
    if isinstance(value, (list, tuple)):
      return tuple(value)
    if isinstance(value, str) and "," in value:
      return tuple(_literal(v.strip()) for v in value.split(","))
    return (value,)
  if isinstance(like, (ml_collections.ConfigDict, dict)):
    raise ValueError("it is a group of options; set its fields one by one "
                     "(--config.KEY.FIELD=VALUE)")
  return _literal(text)  # None or an unknown type: best guess


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets ``config.<key>`` from the command-line string ``text`` (in place)."""
  parts = key.split(".")
  if not key or any(not p for p in parts):
    raise ConfigError(f"malformed override --config.{key}; write --config.a.b=VALUE")
  node = config
  for depth, part in enumerate(parts[:-1]):
    path = ".".join(parts[:depth + 1])
    if part not in node:
      if _may_add(parts[:depth + 1]):
        with node.unlocked() if hasattr(node, "unlocked") else _null():
          node[part] = ml_collections.ConfigDict()
      else:
        raise ConfigError(_unknown_key_msg("config." + path, node, ".".join(parts[:depth])))
    node = node[part]
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      raise ConfigError(f"config.{path} is a {type(node).__name__}, not a group; "
                        f"override it as --config.{path}=VALUE")
  leaf = parts[-1]
  if leaf in node:
    like = node[leaf]
  elif _may_add(parts):
    like = OPTIMIZER[leaf][3] if parts[0] == "optimizer" else None
  else:
    raise ConfigError(_unknown_key_msg("config." + key, node, ".".join(parts[:-1])))
  try:
    value = parse_value(text, like)
  except ValueError as e:
    if isinstance(like, (ml_collections.ConfigDict, dict)):
      raise ConfigError(f"config.{key} {e}") from e
    raise ConfigError(f"bad value for config.{key}: {e}; the current value is "
                      f"{like!r} ({type(like).__name__})") from e
  try:
    if isinstance(node, ml_collections.ConfigDict):
      with node.unlocked():
        if leaf in node and like is None:
          # A None field is typed None by ml-collections; replace the field.
          del node[leaf]
        node[leaf] = value
    else:
      node[leaf] = value
  except TypeError as e:
    raise ConfigError(f"bad value for config.{key}: {e}") from e


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def _may_add(parts: Sequence[str]) -> bool:
  """New keys are allowed below ``solvers.<name>`` (checked by building the solver)
  and for the documented optimizer keys a config file may omit."""
  if len(parts) >= 2 and parts[0] == "solvers":
    return True
  return len(parts) == 2 and parts[0] == "optimizer" and parts[1] in OPTIMIZER


def _unknown_key_msg(full: str, node: Any, prefix: str) -> str:
  names = set(node.keys())
  if prefix == "optimizer":
    names |= set(OPTIMIZER)
  head = ("config." + prefix) if prefix else "config"
  return (f"unknown config key {full!r}; valid keys: "
          + ", ".join(f"{head}.{k}" for k in sorted(names)))


def apply_overrides(config: ml_collections.ConfigDict,
                    pairs: Iterable[tuple[str, str]]) -> ml_collections.ConfigDict:
  for key, text in pairs:
    apply_override(config, key, text)
  return config


# ----- validation -----------------------------------------------------------------

def _type_name(types: tuple) -> str:
  names = {int: "int", float: "float", str: "str", bool: "bool", type(None): "None",
           ml_collections.ConfigDict: "ConfigDict", dict: "dict"}
  return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _check(key: str, value: Any, types: tuple, check, rng: str) -> None:
  ok_type = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
  if not ok_type:
    raise ConfigError(f"config.{key} must be {_type_name(types)}, got {value!r} "
                      f"({type(value).__name__}); set e.g. --config.{key}=VALUE with a "
                      f"{_type_name(types)}")
  if check is not None:
    bad = not check(value)
    if not bad and isinstance(value, float) and not math.isfinite(value):
      bad = True
    if bad:
      raise ConfigError(f"config.{key} = {value!r} is out of range; it must be {rng}")


def to_dict(node: Any) -> Any:
  """ConfigDict/dict -> plain dict (recursively); tuples stay tuples."""
  if isinstance(node, ml_collections.ConfigDict):
    node = node.to_dict()
  if isinstance(node, dict):
    return {k: to_dict(v) for k, v in node.items()}
  return node


def solver_options(config: Any) -> dict:
  """The options passed to ``solvers.get_solver(config.solver, **options)``."""
  solvers_cfg = config.get("solvers", None) or {}
  opts = solvers_cfg.get(config.solver, None) if hasattr(solvers_cfg, "get") else None
  return to_dict(opts) if opts is not None else {}


def optimizer_config(config: Any) -> dict:
  """``config.optimizer`` with the documented defaults filled in."""
  given = to_dict(config.optimizer)
  out = {k: spec[3] for k, spec in OPTIMIZER.items()}
  out.update(given)
  return out


def validate(config: ml_collections.ConfigDict, *, check_solver: bool = True) -> None:
  """Raises :class:`ConfigError` (one line, naming the fix) if ``config`` is invalid.

  Checks the schema of docs/conventions.md: all top-level keys present and no
  others, types and ranges, optimizer keys, problem and solver names against
  the registries, and the solver options by building the solver.
  """
  keys = set(config.keys())
  unknown = sorted(keys - set(TOP_LEVEL))
  if unknown:
    raise ConfigError(f"unknown config key 'config.{unknown[0]}'; valid keys: "
                      f"{', '.join(sorted(TOP_LEVEL))}")
  missing = sorted(set(TOP_LEVEL) - keys)
  if missing:
    raise ConfigError(f"the config lacks key(s) {', '.join(missing)}; every config sets "
                      "all top-level keys (see docs/conventions.md)")
  for key, (types, check, rng) in TOP_LEVEL.items():
    _check(key, config[key], types, check, rng)

  opt = to_dict(config.optimizer)
  bad = sorted(set(opt) - set(OPTIMIZER))
  if bad:
    raise ConfigError(f"unknown config key 'config.optimizer.{bad[0]}'; valid keys: "
                      + ", ".join(f"config.optimizer.{k}" for k in sorted(OPTIMIZER)))
  for key, value in opt.items():
    types, check, rng, _ = OPTIMIZER[key]
    if value is None and key in _OPTIONAL_OPTIMIZER_KEYS:
      continue
    _check(f"optimizer.{key}", value, types, check, rng)
  import optax  # noqa: PLC0415 -- keep `import bilevel.config` light
  name = opt.get("name", "adam")
  if not callable(getattr(optax, name, None)) or name.startswith("_"):
    raise ConfigError(f"config.optimizer.name = {name!r} is not an optax optimizer; use "
                      "e.g. 'adam', 'adamw', 'sgd', 'rmsprop' or 'lamb'")

  import problems  # noqa: PLC0415
  import solvers  # noqa: PLC0415
  if config.problem not in problems.REGISTRY:
    raise ConfigError(f"unknown problem {config.problem!r}; valid problems: "
                      f"{', '.join(sorted(problems.REGISTRY)) or '(none registered)'} "
                      "(set --config.problem=NAME)")
  if config.solver not in solvers.REGISTRY:
    raise ConfigError(f"unknown solver {config.solver!r}; valid solvers: "
                      f"{', '.join(sorted(solvers.REGISTRY))} (set --config.solver=NAME)")
  for name_, opts in to_dict(config.solvers).items():
    if name_ not in solvers.REGISTRY:
      raise ConfigError(f"config.solvers.{name_} names no solver; valid solvers: "
                        f"{', '.join(sorted(solvers.REGISTRY))}")
    if opts is not None and not isinstance(opts, dict):
      raise ConfigError(f"config.solvers.{name_} must be a group of options, got {opts!r}")
  if check_solver:
    build_solver(config)


def build_solver(config: Any):
  """``solvers.get_solver(config.solver, **solver_options(config))``; ConfigError on bad options."""
  import solvers  # noqa: PLC0415
  opts = solver_options(config)
  try:
    solver = solvers.get_solver(config.solver, **opts)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.solvers.{config.solver}: {e}") from e
  return solver


# ----- one call -------------------------------------------------------------------

def load(spec: str, overrides: Iterable[tuple[str, str]] = (), *,
         validate_config: bool = True) -> ml_collections.ConfigDict:
  """``spec`` = ``NAME[:preset]`` or ``path.py[:preset]``; overrides are (key, text) pairs."""
  name, preset = split_spec(spec)
  config = load_config_file(name, preset)
  apply_overrides(config, overrides)
  if validate_config:
    validate(config)
  return config


def config_label(spec: str) -> str:
  """A short name for a config spec: ``mnist_rnn:quick`` -> ``mnist_rnn_quick``."""
  name, preset = split_spec(spec)
  stem = Path(name).stem
  return f"{stem}_{preset}" if preset else stem


def fingerprint(pairs: Iterable[tuple[str, str]], exclude: Sequence[str] = ()) -> str:
  """A short stable hash of the overrides (for default work directories)."""
  items = sorted((k, v) for k, v in pairs if k not in exclude)
  if not items:
    return ""
  return hashlib.sha1(json.dumps(items).encode()).hexdigest()[:8]


def to_json(config: Any) -> str:
  return json.dumps(to_dict(config), indent=2, sort_keys=True, default=repr)


__all__ = ["ConfigError", "apply_override", "available_configs", "apply_overrides", "build_solver",
           "config_label", "config_path", "load", "load_config_file", "optimizer_config",
           "parse_override_args", "solver_options", "split_spec", "to_dict", "validate"]
