"""Pieces shared by the table scripts (``table1_mnist.py``, ``table2_cifar_inr.py``,
``table3_omniglot.py``): the machine a table was made on, one ``launch/sweep.py``
run per problem, the completed summaries of a sweep, mean +- std over seeds.

Run the scripts as modules from the repository root (``python -m
benchmarks.table1_mnist ...``) or with the package installed (``pip install -e .``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import jax

from launch import config as cfglib
from launch import records
from launch import sweeping as sweeplib

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------- the machine

def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def machine_info() -> dict:
  """cpu_model, cores, jax_version, backend, platform and device_kind of device 0."""
  device = jax.devices()[0]
  return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "jax_version": jax.__version__,
          "backend": jax.default_backend(), "platform": device.platform,
          "device_kind": device.device_kind, "device_count": jax.device_count()}


def machine_description(info: Optional[dict] = None) -> str:
  """One line: ``cpu (cpu), host <CPU model> with <n> cores, jax <version>``."""
  m = info or machine_info()
  return (f"{m['platform']} ({m['device_kind']}), host {m['cpu_model']} with "
          f"{m['cores']} cores, jax {m['jax_version']}")


def machine_with_load() -> str:
  """:func:`machine_description` plus the 1/5/15-minute load average (timings depend on it)."""
  load = os.getloadavg()
  return (f"{machine_description()}; load average {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} (1/5/15 min)")


# ----------------------------------------------------------------- overrides

def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]], list[str]]:
  """``(['--config.K=V', ...], [(K, V), ...], other arguments)`` from a command line;
  both ``--config.K=V`` and ``--config.K V`` are understood."""
  argv = cfglib.normalize_argv(argv)
  pairs = cfglib.override_pairs(argv)
  rest = [a for a in argv if not a.startswith(cfglib.PREFIX)]
  return [f"--config.{k}={v}" for k, v in pairs], pairs, rest


# ----------------------------------------------------------------- sweeps

def display_path(path: Path) -> str:
  """``path`` relative to the repository root when it is inside it, else absolute."""
  path = Path(path).absolute()
  try:
    return str(path.relative_to(ROOT))
  except ValueError:
    return str(path)


def _sweep_args(config_spec: str, solvers: Sequence[str], seeds: str, sweepdir: str,
                overrides: Sequence[str], workers: int, metric: Optional[str]) -> list[str]:
  args = ["launch/sweep.py", "--config", config_spec, "--solvers", ",".join(solvers),
          "--seeds", str(seeds), "--workers", str(workers), "--sweepdir", sweepdir]
  return args + (["--metric", metric] if metric else []) + list(overrides)


def sweep_command(config_spec: str, solvers: Sequence[str], seeds: str, sweepdir: Path,
                  overrides: Sequence[str] = (), workers: int = 1,
                  metric: Optional[str] = None) -> str:
  """The ``python launch/sweep.py ...`` command line (run from the repository root)."""
  return shlex.join(["python"] + _sweep_args(config_spec, solvers, seeds,
                                             display_path(sweepdir), overrides, workers, metric))


def run_sweep(config_spec: str, solvers: Sequence[str], seeds: str, sweepdir: Path,
              overrides: Sequence[str] = (), workers: int = 1, metric: Optional[str] = None,
              execute: bool = True) -> str:
  """Runs (``execute``) one ``launch/sweep.py`` over ``solvers`` x ``seeds`` into
  ``sweepdir``, each run getting ``overrides``; returns its command line.

  The sweep is resumable: completed runs are skipped, interrupted ones resume.
  A failed sweep does not raise: the table says what did not complete.
  """
  command = sweep_command(config_spec, solvers, seeds, sweepdir, overrides, workers, metric)
  if execute:
    print("+", command, flush=True)
    args = _sweep_args(config_spec, solvers, seeds, str(Path(sweepdir).absolute()), overrides,
                       workers, metric)
    rc = subprocess.run([sys.executable, *args], cwd=ROOT, check=False).returncode
    if rc:
      print(f"warning: the sweep exited with status {rc} (see its output above); "
            "the table names what did not complete", file=sys.stderr, flush=True)
  return command


def run_order(workdir: Path) -> tuple[str, int]:
  """Sort key of a run directory ``.../<cell>/seed<n>``: cell, then seed as a number."""
  name = Path(workdir).name
  return Path(workdir).parent.name, (int(name[4:]) if name[4:].isdigit() else -1)


def summary_paths(sweepdir: Path, solver: str) -> list[Path]:
  """``<sweepdir>/runs/<solver>/<cell>/seed<n>/summary.json``, by cell then seed."""
  paths = (Path(sweepdir) / "runs" / solver).glob("*/seed*/summary.json")
  return sorted(paths, key=lambda p: run_order(p.parent))


read_json = records.read_json


def completed_summaries(sweepdir: Path, solver: str) -> list[dict]:
  """The summaries of ``solver``'s runs in ``sweepdir`` that completed with an evaluation."""
  out = []
  for path in summary_paths(sweepdir, solver):
    s = read_json(path)
    if s.get("status") == "completed" and s.get("eval"):
      out.append(s)
  return out


def export_summaries(sweepdir: Path, dest: Path) -> list[Path]:
  """Copies every run's ``summary.json`` from ``sweepdir`` to ``dest`` (same layout,
  paths made relative to the sweep), so that a table can be re-made, and completed,
  from the committed summaries on another machine; and its ``metrics.jsonl`` (the
  training curves, a few KB). Returns the summaries written."""
  out = []
  for path in sorted(Path(sweepdir).glob("runs/*/*/seed*/summary.json")):
    curves = path.with_name("metrics.jsonl")
    if curves.exists():
      target = Path(dest) / curves.relative_to(sweepdir)
      target.parent.mkdir(parents=True, exist_ok=True)
      records.atomic_write_text(target, curves.read_text())
    s = read_json(path)
    for key in ("workdir", "checkpoint"):
      if s.get(key):
        try:
          s[key] = str(Path(s[key]).relative_to(Path(sweepdir).absolute()))
        except ValueError:
          s[key] = Path(s[key]).name
    target = Path(dest) / path.relative_to(sweepdir)
    target.parent.mkdir(parents=True, exist_ok=True)
    records.atomic_write_text(target, json.dumps(s, indent=1, sort_keys=True) + "\n")
    out.append(target)
  return out


def run_status(workdir: Path) -> tuple[str, str]:
  """``(status, reason)`` of one run directory; ``('missing', '')`` without a summary."""
  s = read_json(Path(workdir) / "summary.json")
  if not s:
    return ("not started" if not Path(workdir).exists() else "no summary"), ""
  status = s.get("status", "no status")
  if status == "completed" and not s.get("eval"):
    return "completed without evaluation", ""
  return status, s.get("reason") or ""


parse_seeds = sweeplib.parse_seeds  # the very parser the sweep uses


def run_dirs(sweepdir: Path, solver: str, seeds: Iterable[int]) -> list[tuple[int, Path]]:
  """Where ``launch/sweep.py`` puts ``solver``'s runs (no grid) for ``seeds``."""
  return [(r.seed, r.workdir) for r in sweeplib.expand([solver], list(seeds), [],
                                                       Path(sweepdir))]


# ----------------------------------------------------------------- statistics

mean_std = records.mean_std  # sample std (ddof 1; NaN for one value)


def format_mean_std(values: Sequence[float], digits: int = 2, empty: str = "--") -> str:
  """``'m ± s'`` over seeds, ``'m'`` for one seed, ``empty`` for none."""
  if not values:
    return empty
  mean, std = mean_std(values)
  return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def median_or_nan(values: Iterable[Optional[float]]) -> float:
  vals = [v if v is not None else float("nan") for v in values]
  return statistics.median(vals) if vals else float("nan")


def is_finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
