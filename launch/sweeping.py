"""Sweeps: a grid over solvers x seeds x config keys, run in parallel, aggregated.

Each run of the grid is one ``launch/run.py`` subprocess with its own work
directory ``<sweepdir>/runs/<solver>/<key=value,...>/seed<seed>``, so a sweep
inherits everything a run does (checkpoints, resume, failure handling) and a
crashed worker never takes the others down. Backends:

* ``local`` (default): a pool of ``--workers`` concurrent worker processes on
  this machine.
* ``ray``: one Ray task per run (``pip install -e .[ray]``); ``--ray_address``
  joins an existing cluster (the sweep directory must then be on a shared
  file system), otherwise Ray starts a local one-machine cluster.

Resumable: a run whose ``summary.json`` says ``completed`` is skipped, an
interrupted one resumes from its last checkpoint, a failed or diverged one is
reported (and retried with ``--retry_failed``). The children die with the sweep
(even ``kill -9``), and a work-directory lock keeps two processes off one run. When the runs are done the sweep writes
``results.csv`` (one row per run), ``results.md`` (mean +- std over seeds per
cell) and ``comparison.png`` into the sweep directory.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from absl import flags

from launch import config as cfglib
from launch import signals
from launch.records import atomic_savefig, atomic_write_text, fmt, mean_std, read_summary

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_SCRIPT = Path(__file__).resolve().parent / "run.py"


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a sweep."""
  solver: str
  seed: int
  params: tuple[tuple[str, str], ...]   # grid key -> value (command-line text)
  workdir: Path

  @property
  def cell(self) -> tuple:
    """Runs differing only in the seed share a cell."""
    return (self.solver,) + self.params

  @property
  def run_id(self) -> str:
    return "/".join(self.workdir.parts[-3:])

  def overrides(self, fixed: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    return list(fixed) + [("solver", self.solver), ("seed", str(self.seed))] + list(self.params)


def parse_grid_arg(text: str) -> tuple[str, list[str]]:
  """``'optimizer.learning_rate=1e-3,1e-2'`` -> ``('optimizer.learning_rate', ['1e-3', '1e-2'])``.

  Values are split on commas; write a Python list to give values that contain
  commas (tuples): ``'problem_options.sizes=[(8, 8), (16, 16)]'``.
  """
  if "=" not in text:
    raise cfglib.ConfigError(f"--grid {text!r} has no '='; write --grid KEY=V1,V2,...")
  key, values = text.split("=", 1)
  key = key.strip()
  if key.startswith("config."):
    key = key[len("config."):]
  values = values.strip()
  if values.startswith("["):
    try:
      parsed = ast.literal_eval(values)
    except (ValueError, SyntaxError) as e:
      raise cfglib.ConfigError(f"--grid {key}: cannot parse {values!r} as a list ({e}); "
                               "write --grid KEY=V1,V2 or KEY='[V1, V2]'") from e
    vals = [repr(v) if not isinstance(v, str) else v for v in parsed]
  else:
    vals = [v.strip() for v in values.split(",") if v.strip()]
  if not vals:
    raise cfglib.ConfigError(f"--grid {key} has no values; write --grid {key}=V1,V2")
  if key in ("solver", "seed"):
    raise cfglib.ConfigError(f"use --solvers/--seeds for {key!r}, not --grid")
  return key, vals


def _slug(text: str) -> str:
  keep = "".join(c if (c.isalnum() or c in "-_.=+") else "_" for c in text)
  return keep[:80] or "_"


def expand(solvers: Sequence[str], seeds: Sequence[int], grid: Sequence[tuple[str, list[str]]],
           sweepdir: Path) -> list[RunSpec]:
  """The cartesian product solvers x grid values x seeds, as RunSpecs."""
  keys = [k for k, _ in grid]
  runs = []
  for solver in solvers:
    for combo in itertools.product(*[v for _, v in grid]):
      params = tuple(zip(keys, combo))
      cell_dir = ",".join(f"{k.split('.')[-1]}={v}" for k, v in params) or "default"
      for seed in seeds:
        runs.append(RunSpec(solver, int(seed), params,
                            sweepdir / "runs" / _slug(solver) / _slug(cell_dir) / f"seed{seed}"))
  return runs


def validate_runs(config_spec: str, runs: Sequence[RunSpec],
                  fixed: Sequence[tuple[str, str]]) -> None:
  """Loads and validates every run's config (no compilation); ConfigError on the first bad one."""
  checked = set()
  for run in runs:
    key = run.cell
    if key in checked:
      continue
    checked.add(key)
    try:
      cfglib.load(config_spec, run.overrides(fixed))
    except cfglib.ConfigError as e:
      where = f"solver={run.solver}" + "".join(f", {k}={v}" for k, v in run.params)
      raise cfglib.ConfigError(f"sweep cell ({where}): {e}") from e


def run_command(config_spec: str, run: RunSpec, fixed: Sequence[tuple[str, str]],
                extra_args: Sequence[str] = ()) -> list[str]:
  cmd = [sys.executable, str(RUN_SCRIPT), "--config", config_spec, "--workdir",
         str(run.workdir), "--no_progress", *extra_args]
  cmd += [f"--config.{k}={v}" for k, v in run.overrides(fixed)]
  return cmd


def execute(cmd: Sequence[str], log_path: str, env: Optional[dict] = None) -> int:
  """Runs one command, output appended to ``log_path``; returns its exit status."""
  Path(log_path).parent.mkdir(parents=True, exist_ok=True)
  with open(log_path, "ab") as log:
    log.write(f"$ {' '.join(cmd)}\n".encode())
    log.flush()
    proc = subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                          cwd=str(REPO_ROOT), env=env)
  return proc.returncode


def _worker_env(die_with_sweep: bool = False) -> dict:
  env = dict(os.environ)
  pp = env.get("PYTHONPATH", "")
  env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
  if die_with_sweep:  # launch/run.py asks the kernel for SIGTERM when we die
    env[signals.PARENT_ENV] = str(os.getpid())
  return env


def run_local(jobs: list[tuple[RunSpec, list[str], str]], workers: int,
              on_done: Callable[[RunSpec, int], None]) -> None:
  """A pool of worker threads, each waiting on one ``launch/run.py`` child. The
  children die with the sweep (SIGTERM, even when the sweep is killed with -9:
  :func:`launch.signals.die_with_parent`) and are in its process group (Ctrl-C
  reaches them); each run's work-directory lock keeps a rerun off a live child."""
  env = _worker_env(die_with_sweep=True)
  with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    futures = {pool.submit(execute, cmd, log, env): run for run, cmd, log in jobs}
    for fut in as_completed(futures):
      on_done(futures[fut], fut.result())


def run_ray(jobs: list[tuple[RunSpec, list[str], str]], workers: int,
            on_done: Callable[[RunSpec, int], None], address: Optional[str] = None) -> None:
  try:
    import ray  # noqa: PLC0415 -- optional extra
  except ImportError as e:
    raise cfglib.ConfigError("the ray backend needs Ray: pip install -e '.[ray]' "
                             "(or use --backend local)") from e
  init_kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False,
                                 "include_dashboard": False}
  if address:
    init_kwargs["address"] = address
  else:
    init_kwargs["num_cpus"] = max(1, workers)
  ray.init(**init_kwargs)
  try:
    remote = ray.remote(num_cpus=1)(execute)
    env = _worker_env()
    refs = {remote.remote(cmd, log, env): run for run, cmd, log in jobs}
    pending = list(refs)
    while pending:
      done, pending = ray.wait(pending, num_returns=1)
      for ref in done:
        on_done(refs[ref], ray.get(ref))
  finally:
    ray.shutdown()


# ----- aggregation --------------------------------------------------------------------

def _flat_metrics(summary: dict) -> dict:
  out = {}
  for split in ("train", "eval"):
    for k, v in (summary.get(split) or {}).items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        out[f"{split}/{k}"] = float(v)
  for k in ("wall_time_s", "seconds_per_step", "steps"):
    if isinstance(summary.get(k), (int, float)):
      out[k] = float(summary[k])
  return out


def collect(runs: Sequence[RunSpec]) -> list[dict]:
  """One row per run: solver, seed, grid values, status and flattened metrics."""
  rows = []
  for run in runs:
    s = read_summary(run.workdir)
    row = {"solver": run.solver, "seed": run.seed, **dict(run.params),
           "status": s.get("status", "missing"), "workdir": str(run.workdir)}
    row.update(_flat_metrics(s) if s.get("status") == "completed" else {})
    rows.append(row)
  return rows


def default_metric(rows: Sequence[dict]) -> str:
  """eval accuracy if there is one (``eval/accuracy``, ``eval/test_accuracy``, ...),
  else the eval loss, else the train accuracy / loss."""
  keys = sorted({k for r in rows for k in r})
  for split in ("eval/", "train/"):
    for word in ("accuracy", "loss"):
      exact = f"{split}{word}"
      if exact in keys:
        return exact
      close = [k for k in keys if k.startswith(split) and k.endswith(word)
               and "controlled" not in k]
      if close:
        return sorted(close, key=len)[0]
  return "train/loss"


def aggregate(rows: Sequence[dict], grid_keys: Sequence[str], metrics: Sequence[str]
              ) -> list[dict]:
  """Mean and std over seeds of each metric, per (solver, grid values) cell."""
  cells: dict[tuple, list[dict]] = {}
  for r in rows:
    cells.setdefault((r["solver"],) + tuple(r.get(k) for k in grid_keys), []).append(r)
  out = []
  for key, members in cells.items():
    ok = [m for m in members if m["status"] == "completed"]
    cell = {"solver": key[0], **dict(zip(grid_keys, key[1:])), "n": len(ok),
            "runs": len(members)}
    for metric in metrics:
      vals = [m[metric] for m in ok if isinstance(m.get(metric), float)
              and math.isfinite(m[metric])]
      if vals:
        cell[metric] = mean_std(vals, empty_std=0.0)
    out.append(cell)
  return out


def write_csv(rows: Sequence[dict], path: Path) -> None:
  keys: list[str] = []
  for r in rows:
    keys += [k for k in r if k not in keys]
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in rows:
      w.writerow(r)
  os.replace(tmp, path)


def markdown_table(cells: Sequence[dict], grid_keys: Sequence[str],
                   metrics: Sequence[str]) -> str:
  head = ["solver", *grid_keys, *metrics, "seeds"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for c in cells:
    vals = [c["solver"], *[str(c.get(k, "")) for k in grid_keys]]
    for m in metrics:
      vals.append(f"{fmt(float(c[m][0]))} ± {fmt(float(c[m][1]))}" if m in c else "—")
    vals.append(f"{c['n']}/{c['runs']}")
    lines.append("| " + " | ".join(vals) + " |")
  return "\n".join(lines) + "\n"


def plot_comparison(cells: Sequence[dict], grid_keys: Sequence[str], metric: str,
                    path: Path) -> Optional[Path]:
  cells = [c for c in cells if metric in c]
  if not cells:
    return None
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  labels = [c["solver"] + "".join(f"\n{k.split('.')[-1]}={c.get(k)}" for k in grid_keys)
            for c in cells]
  means = [c[metric][0] for c in cells]
  stds = [c[metric][1] for c in cells]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(cells) + 1.5), 3.8))
  ax.bar(range(len(cells)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
  ax.set_xticks(range(len(cells)))
  ax.set_xticklabels(labels, fontsize=7)
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} (mean ± std over seeds)")
  fig.tight_layout()
  return atomic_savefig(fig, path)


def write_reports(sweepdir: Path, runs: Sequence[RunSpec], grid_keys: Sequence[str],
                  metric: Optional[str] = None, header: str = "") -> dict:
  """results.csv, results.md and comparison.png from the runs' summary.json files."""
  rows = collect(runs)
  write_csv(rows, sweepdir / "results.csv")
  metric = metric or default_metric(rows)
  present = {k for r in rows for k in r}
  metrics = [metric] + [m for m in ("eval/loss", "train/loss", "seconds_per_step")
                        if m in present and m != metric]
  cells = aggregate(rows, grid_keys, metrics)
  md = (header + "\n\n" if header else "") + markdown_table(cells, grid_keys, metrics)
  failed = [r for r in rows if r["status"] != "completed"]
  if failed:
    md += "\nNot completed: " + ", ".join(
        f"{Path(r['workdir']).relative_to(sweepdir)} ({r['status']})" for r in failed) + "\n"
  atomic_write_text(sweepdir / "results.md", md)
  try:
    plot_comparison(cells, grid_keys, metric, sweepdir / "comparison.png")
  except Exception as e:  # noqa: BLE001 -- plotting must not lose results
    print(f"warning: could not plot ({type(e).__name__}: {e})", file=sys.stderr)
  return {"rows": rows, "cells": cells, "metric": metric, "markdown": md}


# ----- command line -------------------------------------------------------------------

def define_flags(fv: flags.FlagValues) -> None:
  """The sweep's flags besides ``--config`` and the fixed overrides ``--config.KEY=V``."""
  flags.DEFINE_string("solvers", None, "comma-separated solver names (default: the "
                      "config's solver)", flag_values=fv)
  flags.DEFINE_string("seeds", "0", "comma-separated seeds, or a range 0-4", flag_values=fv)
  flags.DEFINE_multi_string("grid", [], "KEY=V1,V2: a config key and its values "
                            "(repeatable: cartesian product)", flag_values=fv)
  flags.DEFINE_string("sweepdir", None, "where runs and reports go (default "
                      "runs/sweeps/<config>)", flag_values=fv)
  flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 2) // 2),
                       "parallel runs (default: half the CPU cores)", flag_values=fv)
  flags.DEFINE_enum("backend", "local", ["local", "ray"], "where the runs execute",
                    flag_values=fv)
  flags.DEFINE_string("ray_address", None, "join this Ray cluster (default: start a "
                      "local one)", flag_values=fv)
  flags.DEFINE_string("metric", None, "metric for the table's first column and the plot, "
                      "e.g. eval/accuracy", flag_values=fv)
  flags.DEFINE_boolean("retry_failed", False, "re-run runs whose summary says failed "
                       "(they resume)", flag_values=fv)
  flags.DEFINE_boolean("dry_run", False, "list the runs and exit", flag_values=fv)
  flags.DEFINE_boolean("report_only", False, "only aggregate what is already there",
                       flag_values=fv)


def parse_seeds(text: str) -> list[int]:
  """``'0,1,2'`` or ``'0-2'`` -> ``[0, 1, 2]``."""
  out = []
  for part in (p.strip() for p in text.split(",")):
    try:
      if "-" in part[1:]:
        a, b = part.split("-", 1)
        out += list(range(int(a), int(b) + 1))
      elif part:
        out.append(int(part))
    except ValueError as e:
      raise cfglib.ConfigError(f"--seeds {text!r}: {part!r} is not an int or a range "
                               "like 0-4") from e
  if not out:
    raise cfglib.ConfigError("--seeds is empty; write e.g. --seeds 0,1,2")
  return out


@dataclasses.dataclass
class Plan:
  """A parsed sweep command: what to run where."""
  spec: str
  fixed: list
  solvers: list
  seeds: list
  grid: list
  sweepdir: Path
  runs: list
  command: str

  @property
  def grid_keys(self) -> list[str]:
    return [k for k, _ in self.grid]

  def log_path(self, run: RunSpec) -> Path:
    return self.sweepdir / "logs" / (run.run_id.replace("/", "__") + ".log")


def make_plan(argv: Sequence[str], fv: flags.FlagValues) -> Plan:
  """Parses and validates the command line (ConfigError on anything wrong)."""
  base = cfglib.parse_flags(argv, fv)[0]
  spec = fv["config"].config_filename
  fixed = cfglib.override_pairs(cfglib.normalize_argv(argv))
  solvers = ([s.strip() for s in fv.solvers.split(",") if s.strip()] if fv.solvers
             else [base.solver])
  seeds = parse_seeds(fv.seeds)
  grid = [parse_grid_arg(g) for g in fv.grid]
  sweepdir = Path(fv.sweepdir or Path("runs") / "sweeps" / cfglib.config_label(spec))
  validate_runs(spec, expand(solvers, seeds, grid, sweepdir), fixed)
  sweepdir = sweepdir.absolute()
  return Plan(spec, fixed, solvers, seeds, grid, sweepdir,
              expand(solvers, seeds, grid, sweepdir),
              "python launch/sweep.py " + " ".join(argv))


def pending_runs(plan: Plan, retry_failed: bool) -> tuple[list[RunSpec], int]:
  """Runs still to do, and how many are done (completed, or failed and not retried)."""
  todo = []
  for run in plan.runs:
    status = read_summary(run.workdir).get("status")
    stopped = status in ("failed", "diverged")
    if not (status == "completed" or (stopped and not retry_failed)):
      todo.append(run)
  return todo, len(plan.runs) - len(todo)


def launch_runs(plan: Plan, todo: list[RunSpec], fv: flags.FlagValues) -> int:
  """Runs ``todo`` on the chosen backend, printing one line per finished run;
  returns the number of failures."""
  jobs = [(run, run_command(plan.spec, run, plan.fixed), str(plan.log_path(run)))
          for run in todo]
  t0, counts = time.time(), {"done": 0, "failed": 0}

  def on_done(run: RunSpec, rc: int) -> None:
    counts["done"] += 1
    counts["failed"] += rc != 0
    status = read_summary(run.workdir).get("status", "no summary")
    print(f"[{counts['done']}/{len(todo)}] {run.run_id}: {status} (exit {rc}, "
          f"{time.time() - t0:.0f}s)" + (f"; log: {plan.log_path(run)}" if rc else ""),
          flush=True)

  if fv.backend == "ray":
    run_ray(jobs, fv.workers, on_done, fv.ray_address)
  else:
    run_local(jobs, fv.workers, on_done)
  return counts["failed"]


def sweep(plan: Plan, fv: flags.FlagValues) -> int:
  """Runs what is left of the sweep and writes its reports; returns the exit status."""
  plan.sweepdir.mkdir(parents=True, exist_ok=True)
  atomic_write_text(plan.sweepdir / "sweep.json", json.dumps(
      {"command": plan.command, "config": plan.spec, "solvers": plan.solvers,
       "seeds": plan.seeds, "grid": plan.grid, "fixed": plan.fixed}, indent=2) + "\n")
  todo, done = pending_runs(plan, fv.retry_failed)
  print(f"sweep: {len(plan.runs)} runs ({len(plan.solvers)} solvers x "
        f"{len(plan.runs) // max(1, len(plan.solvers) * len(plan.seeds))} grid points x "
        f"{len(plan.seeds)} seeds) -> {plan.sweepdir}; {done} already done, "
        f"{len(todo)} to run")
  if fv.dry_run:
    for run in todo:
      print("  " + " ".join(run_command(plan.spec, run, plan.fixed)))
    return 0
  failures = launch_runs(plan, todo, fv) if todo and not fv.report_only else 0
  report = write_reports(plan.sweepdir, plan.runs, plan.grid_keys, fv.metric,
                         header=f"Sweep `{plan.command}`")
  print(report["markdown"])
  print(f"results: {plan.sweepdir}/results.csv  {plan.sweepdir}/results.md  "
        f"{plan.sweepdir}/comparison.png")
  if failures:
    print(f"{failures} run(s) failed; see the logs above. Re-running the same command "
          "resumes the unfinished ones", file=sys.stderr)
    return 1
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``launch/sweep.py``: returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  define_flags(fv)
  if {"-h", "--help", "--helpfull"} & set(argv):
    print(__doc__ + "\nFlags:\n" + fv.get_help())
    return 0
  try:
    return sweep(make_plan(argv, fv), fv)
  except cfglib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


__all__ = ["Plan", "RunSpec", "aggregate", "collect", "expand", "main", "make_plan",
           "parse_grid_arg", "parse_seeds", "write_reports"]
