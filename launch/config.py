"""Experiment configs: ``--config NAME[:preset]`` and ``--config.KEY=VALUE`` overrides.

A config file ``configs/NAME.py`` defines ``get_config(preset=None) ->
ml_collections.ConfigDict`` deriving from ``configs/base.py`` (the one schema).
Overrides are parsed by ``ml_collections.config_flags`` (absl flags): the value
is parsed by the type of the field it replaces, and a key that does not exist
is an error. Three things ``config_flags`` cannot do are prepared here before
it parses (docs/running.md, "Overrides"):

* ``--config NAME[:preset]`` names a file in ``configs/`` (a path works too);
* new keys below ``solvers.<name>`` (options the file does not set, checked by
  building the solver) and the optional optimizer keys, and a new value for a
  field that is ``None``, get a placeholder so that config_flags can parse them;
* ``--config.KEY VALUE`` (no ``=``) is joined to ``--config.KEY=VALUE`` so that
  it works for booleans too, and overrides may come before ``--config``.

Every error is one :class:`ConfigError` line naming the fix.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from configs import base
from launch.schema import (ConfigError, build_solver, optimizer_config, solver_options,
                           to_dict, validate)

CONFIG_DIR = Path(base.__file__).resolve().parent
PREFIX = "--config."


# ----- config files ---------------------------------------------------------------

def split_spec(spec: str) -> tuple[str, Optional[str]]:
  """``'NAME:preset'`` -> ``('NAME', 'preset')``; ``'NAME'`` -> ``('NAME', None)``."""
  if ":" in spec:
    name, preset = spec.split(":", 1)
    return name, (preset or None)
  return spec, None


def available_configs() -> list[str]:
  """Names of the config files in ``configs/`` (files defining ``get_config``)."""
  return [p.stem for p in sorted(CONFIG_DIR.glob("*.py"))
          if not p.stem.startswith("_") and "def get_config" in p.read_text()]


def config_path(name: str) -> Path:
  """Resolves a config name (``mnist_rnn``) or a path (``configs/x.py``) to a file."""
  if name.endswith(".py") or "/" in name:
    if not Path(name).is_file():
      raise ConfigError(f"config file {name!r} does not exist; give a path to a .py file "
                        f"or one of the names: {', '.join(available_configs())}")
    return Path(name)
  path = CONFIG_DIR / f"{name}.py"
  if not path.is_file():
    raise ConfigError(f"unknown config {name!r}; valid configs are: "
                      f"{', '.join(available_configs())} (or pass a path to a .py file)")
  return path


def load_config_file(name: str, preset: Optional[str] = None) -> ml_collections.ConfigDict:
  """Imports the config file and calls ``get_config(preset)`` (one-line errors)."""
  path = config_path(name)
  spec = importlib.util.spec_from_file_location(f"_bilevel_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 -- user code; reported in one line
    raise ConfigError(f"config file {path} failed to import: {type(e).__name__}: {e}; "
                      "fix the file") from e
  fn = getattr(module, "get_config", None)
  if fn is None:
    raise ConfigError(f"config file {path} defines no get_config(preset=None); add one")
  if preset is not None and not inspect.signature(fn).parameters:
    raise ConfigError(f"config {path.stem!r} has no presets (get_config takes no "
                      f"argument); drop ':{preset}'")
  try:
    config = fn() if preset is None else fn(preset)
  except (ValueError, KeyError) as e:
    msg = e.args[0] if e.args else str(e)
    raise ConfigError(f"config {path.stem!r} rejected preset {preset!r}: {msg}") from e
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict, "
                      f"got {type(config).__name__}")
  return config


# ----- command-line overrides (parsed by ml_collections.config_flags) -------------------

def normalize_argv(argv: Sequence[str]) -> list[str]:
  """Joins ``--config.K V`` into ``--config.K=V``; other arguments unchanged."""
  out, argv, i = [], list(argv), 0
  while i < len(argv):
    arg = argv[i]
    if (arg.startswith(PREFIX) and "=" not in arg and i + 1 < len(argv)
        and not argv[i + 1].startswith("--")):
      arg, i = f"{arg}={argv[i + 1]}", i + 1
    out.append(arg)
    i += 1
  return out


def override_pairs(argv: Sequence[str]) -> list[tuple[str, str]]:
  """``(KEY, text)`` of every ``--config.KEY=text`` in a normalized argv, in order."""
  pairs = []
  for arg in argv:
    if arg.startswith(PREFIX):
      key, _, text = arg[len(PREFIX):].partition("=")
      pairs.append((key, text))
  return pairs


def _may_add(parts: Sequence[str]) -> bool:
  """Keys a command line may add: options below ``solvers.<name>`` (checked by building
  the solver) and the optional optimizer keys."""
  if len(parts) >= 3 and parts[0] == "solvers":
    return True
  return len(parts) == 2 and parts[0] == "optimizer" and parts[1] in base.OPTIONAL_OPTIMIZER


def _add_placeholders(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
  """Makes room for overrides config_flags cannot parse: new keys that may be added
  and fields whose value is None (typed by nothing) become untyped placeholders,
  whose text config_flags parses as a Python literal."""
  for key in keys:
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts[:-1]):
      if part not in node:
        if not _may_add(parts[:depth + 1] + ["x"]) and not _may_add(parts):
          break
        node[part] = ml_collections.ConfigDict()
      node = node[part]
      if not isinstance(node, ml_collections.ConfigDict):
        break
    else:
      leaf = parts[-1]
      if (leaf not in node and _may_add(parts)) or (leaf in node and node[leaf] is None):
        if leaf in node:
          del node[leaf]
        node[leaf] = ml_collections.FieldReference(None, field_type=object)


class _ConfigFileParser(flags.ArgumentParser):
  """``NAME[:preset]`` -> the config (our loader), with placeholders for the overrides;
  replaces the parser of the ``--config`` flag that ``config_flags`` defines."""

  def __init__(self, keys: Sequence[str]):
    self.keys = list(keys)
    self.error: Optional[ConfigError] = None
    self.config: Optional[ml_collections.ConfigDict] = None

  def parse(self, spec):
    try:
      config = load_config_file(*split_spec(spec))
    except ConfigError as e:
      self.error = e
      raise
    _add_placeholders(config, self.keys)
    config.lock()
    self.config = config
    return config

  def flag_type(self):
    return "config object"


def _unknown_key(config: Any, keys: Sequence[str]) -> Optional[ConfigError]:
  """The error for the first override key that names no field of ``config``."""
  for key in keys:
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict):
        where = ".".join(parts[:depth])
        return ConfigError(f"config.{where} is a {type(node).__name__}, not a group; "
                           f"override it as --config.{where}=VALUE")
      if part not in node:
        head = ".".join(["config"] + parts[:depth])
        return ConfigError(f"unknown config key 'config.{key}'; valid keys: "
                           + ", ".join(f"{head}.{k}" for k in sorted(node.keys())))
      node = node[part]
  return None


def _flag_error(e: Exception, parser: "_ConfigFileParser") -> ConfigError:
  """config_flags' / absl's error -> one ConfigError line naming the fix."""
  if parser.error is not None:
    return parser.error
  if parser.config is not None:
    unknown = _unknown_key(parser.config, parser.keys)
    if unknown is not None:
      return unknown
  text = str(e).strip()
  lines = [line for line in text.splitlines() if line.strip()]
  if text.startswith("flag --config."):
    key, _, rest = text[len("flag --config."):].partition(":")
    return ConfigError(f"bad value for config.{key.split('=')[0]}:{rest.rstrip('.')}; "
                       "give a value of the field's type")
  return ConfigError((lines[-1] if lines else type(e).__name__) + "; see --help")


def parse_flags(argv: Sequence[str], flag_values: Optional[flags.FlagValues] = None
                ) -> tuple[ml_collections.ConfigDict, flags.FlagValues, list[str]]:
  """Parses ``argv`` (without the program name): ``--config NAME[:preset]``, its
  overrides, and any other absl flags defined in ``flag_values``.

  Returns ``(config, flag_values, positional arguments)``; ConfigError on a bad
  config, key or value.
  """
  fv = flag_values if flag_values is not None else flags.FlagValues()
  argv = normalize_argv(argv)
  spec_at = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
  if not spec_at:
    raise ConfigError("no config given; pass --config NAME[:preset] "
                      f"(one of {', '.join(available_configs())})")
  i = spec_at[-1]
  spec = argv[i + 1] if argv[i] == "--config" and i + 1 < len(argv) else argv[i][9:]
  rest = argv[:i] + argv[i + (2 if argv[i] == "--config" else 1):]
  keys = [k for k, _ in override_pairs(rest)]
  ordered = ["prog", f"--config={spec}"] + [a for a in rest if a.startswith(PREFIX)] \
      + [a for a in rest if not a.startswith(PREFIX)]
  parser = _ConfigFileParser(keys)
  config_flags.DEFINE_config_file("config", None, "NAME[:preset]", flag_values=fv,
                                  sys_argv=ordered)
  fv["config"].parser = parser
  try:
    positional = fv(ordered)[1:]
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise _flag_error(e, parser) from e
  config = fv.config
  if positional:
    raise ConfigError(f"unexpected argument {positional[0]!r}; write overrides as "
                      "--config.KEY=VALUE")
  return config, fv, positional


# ----- one call ------------------------------------------------------------------------

def load(spec: str, overrides: Iterable[tuple[str, str]] = (), *,
         validate_config: bool = True) -> ml_collections.ConfigDict:
  """``spec`` = ``NAME[:preset]`` or ``path.py[:preset]``; ``overrides`` are
  ``(key, text)`` pairs as on the command line. Validated unless told otherwise."""
  argv = ["--config", spec] + [f"{PREFIX}{k}={v}" for k, v in overrides]
  config = parse_flags(argv)[0]
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


__all__ = ["ConfigError", "available_configs", "build_solver", "config_label", "config_path",
           "fingerprint", "load", "load_config_file", "normalize_argv", "optimizer_config",
           "override_pairs", "parse_flags", "solver_options", "split_spec", "to_dict",
           "validate"]
