"""The work directory of a run: its default name, the recorded config, and whether a
new config may resume what is there."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable

from launch.config import ConfigError, config_label, fingerprint
from launch.records import atomic_write_text, read_json, read_summary

# Config keys that may differ when resuming in an existing work directory.
RESUMABLE_CHANGES = {"num_steps", "num_epochs", "log_every_steps", "eval_every_epochs",
                     "checkpoint_every_steps", "checkpoint_every_minutes",
                     "keep_checkpoints", "on_nonfinite", "max_nonconverged_fraction",
                     "max_loss_growth", "on_invalid_examples", "data_dir"}
LOCK_NAME = ".lock"


def prepare_dir(workdir: Path) -> None:
  """Creates ``workdir``; a ConfigError (one line) when it cannot be used."""
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"work directory {workdir} is a file; pass another --workdir "
                      "(or remove that file)")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-test-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"cannot write to work directory {workdir} ({e.strerror or e}); "
                      "pass a writable --workdir") from e


def lock(workdir: Path) -> int:
  """Takes the exclusive lock of ``workdir`` (``fcntl.flock`` on ``workdir/.lock``,
  holding this pid); returns its file descriptor (closing it releases the lock, as
  does the end of the process). ConfigError naming the holder's pid when another
  process holds it."""
  prepare_dir(workdir)
  fd = os.open(workdir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
    os.close(fd)
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise
    raise ConfigError(f"work directory {workdir} is in use by process {holder} (another "
                      "launch/run.py); wait for it to finish, stop it, or pass another "
                      "--workdir") from e
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
  return fd


def unlock(fd: int | None) -> None:
  if fd is not None:
    os.close(fd)


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


def config_changed(workdir: Path, config_dict: dict) -> bool:
  """Whether ``workdir/config.json`` records another config (any non-resumable key)."""
  recorded = read_json(workdir / "config.json")
  return bool(recorded) and bool(config_changes(recorded.get("config", {}), config_dict))


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
  if read_summary(workdir).get("status") in ("failed", "diverged"):
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


__all__ = ["RESUMABLE_CHANGES", "config_changed", "lock", "prepare_dir", "unlock", "check_config_compatible", "config_changes",
           "default_workdir", "write_config"]
