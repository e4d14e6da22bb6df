"""The work directory of a run: its default name, the recorded config, and whether a
new config may resume what is there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from launch.config import ConfigError, config_label, fingerprint
from launch.records import atomic_write_text, read_json, read_summary

# Config keys that may differ when resuming in an existing work directory.
RESUMABLE_CHANGES = {"num_steps", "num_epochs", "log_every_steps", "eval_every_epochs",
                     "checkpoint_every_steps", "keep_checkpoints", "on_nonfinite",
                     "max_nonconverged_fraction", "data_dir"}


def default_workdir(spec: str, config: Any, pairs: list[tuple[str, str]]) -> Path:
  """``runs/<config>[_<preset>]/<solver>_seed<seed>[_<hash of the other overrides>]``:
  the same command always maps to the same directory, so re-running it resumes."""
  tag = fingerprint(pairs, exclude=("solver", "seed"))
  name = f"{config.solver}_seed{config.seed}" + (f"_{tag}" if tag else "")
  return Path("runs") / config_label(spec) / name


def flatten(d: Any, prefix: str = "") -> dict:
  """Nested dicts -> ``{'a.b': value}``."""
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
  return out


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """``(key, old, new)`` of the differing keys that a resume may not change."""
  old, new = flatten(old), flatten(json.loads(json.dumps(new, default=repr)))
  return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and k.split(".")[0] not in RESUMABLE_CHANGES]


def check_config_compatible(workdir: Path, config_dict: dict,
                            log: Callable[[str], None]) -> None:
  """Refuses to resume a different config, except harmless keys, or anything after
  a failed run (so that the fix can resume from the last good checkpoint)."""
  recorded = read_json(workdir / "config.json")
  if not recorded:
    return
  diffs = config_changes(recorded.get("config", {}), config_dict)
  if not diffs:
    return
  if read_summary(workdir).get("status") == "failed":
    log("note: resuming a failed run with a changed config ("
        + ", ".join(f"config.{k}: {a!r} -> {b!r}" for k, a, b in diffs) + ")")
    return
  k, a, b = diffs[0]
  raise ConfigError(
      f"work directory {workdir} holds a run with a different config "
      f"(config.{k}: {a!r} there, {b!r} now); pass another "
      "--workdir, or delete that directory to start over")


def write_config(workdir: Path, config_name: str, command: str, config_dict: dict) -> None:
  """``config.json``: the resolved config and the command that made it."""
  atomic_write_text(workdir / "config.json", json.dumps(
      {"config_name": config_name, "command": command, "config": config_dict},
      indent=2, sort_keys=True, default=repr) + "\n")


__all__ = ["RESUMABLE_CHANGES", "check_config_compatible", "config_changes",
           "default_workdir", "write_config"]
