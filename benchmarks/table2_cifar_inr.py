#!/usr/bin/env python
"""Table 2 of the paper: CIFAR-10 (feedforward conv net, DEQ) and INR, every method.

    python -m benchmarks.table2_cifar_inr                              # quick preset (CPU)
    python -m benchmarks.table2_cifar_inr --preset paper --seeds 0,1,2 # paper scale (accelerator)
    python -m benchmarks.table2_cifar_inr --report_only                # re-tabulate finished runs

trains, with one ``launch/sweep.py`` per problem (resumable: re-running the
command finishes or extends what is there),

    C10 FF    ``cifar10_ff``   bp, lcp_di, lcp_kp     test accuracy (%)
    C10 DEQ   ``cifar10_deq``  rbp, lcp_di            test accuracy (%)
    INR       ``inr``          rbp, lcp_di            PSNR (dB) on the full pixel grid

into ``--out`` (default ``runs/table2``; one sweep directory per problem, preset
and set of overrides) and writes ``benchmarks/results/table2_cifar_inr.md``:
rows = methods, columns = problems, each cell "paper / ours (mean ± std over the
seeds that completed)", with the protocol of THIS table, the data each problem
used (CIFAR-10 runs on the LOSSY JPEG copy are labelled so; INR names its one
image), the exact commands, the machine and what did not complete.
``--problems`` / ``--solvers`` restrict what is trained; extra
``--config.KEY=VALUE`` arguments go to every run whose config accepts them (and
are named in the table; e.g. ``--config.problem_options.image=grace_hopper``
reaches the INR runs only).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from benchmarks import common
from launch import config as cfglib
from launch.records import atomic_write_text
from problems.datasets import cifar10

ROOT = Path(__file__).resolve().parent.parent



@dataclasses.dataclass(frozen=True)
class Problem:
  key: str             # --problems name
  column: str          # column of the table
  config: str          # configs/<config>.py
  solvers: tuple       # what Table 2 trains on it
  metric: str          # key of the summary's "eval" dict
  scale: float         # metric x scale = the number in the table (%, dB)


PROBLEMS = (
    Problem("ff", "C10 FF", "cifar10_ff", ("bp", "lcp_di", "lcp_kp"), "accuracy", 100.0),
    Problem("deq", "C10 DEQ", "cifar10_deq", ("rbp", "lcp_di"), "accuracy", 100.0),
    Problem("inr", "INR PSNR", "inr", ("rbp", "lcp_di"), "psnr", 1.0),
)
# Rows: method -> the solver that stands for it in each column (absent: not in the paper).
METHODS = (("BP / RBP", {"ff": "bp", "deq": "rbp", "inr": "rbp"}),
           ("LCP - DI", {"ff": "lcp_di", "deq": "lcp_di", "inr": "lcp_di"}),
           ("LCP - DI (KP)", {"ff": "lcp_kp"}))
# Paper, Table 2: test accuracy (%) on CIFAR-10, PSNR (dB) for INR.
PAPER = {("BP / RBP", "ff"): 77.58, ("LCP - DI", "ff"): 77.28, ("LCP - DI (KP)", "ff"): 77.16,
         ("BP / RBP", "deq"): 80.14, ("LCP - DI", "deq"): 80.26,
         ("BP / RBP", "inr"): 25.47, ("LCP - DI", "inr"): 25.11}
LOSSY_MARK = "†"


# ----------------------------------------------------------------- where things are

def config_spec(problem: Problem, preset: str) -> str:
  return problem.config if preset in ("", "paper", "default") else f"{problem.config}:{preset}"


def applicable(problem: Problem, preset: str,
               pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
  """The overrides ``problem``'s config accepts (``problem_options.image`` is only INR's)."""
  return [pair for pair in pairs if _accepts(config_spec(problem, preset), tuple(pair))]


@functools.lru_cache(maxsize=None)
def _accepts(spec: str, pair: tuple[str, str]) -> bool:
  try:
    cfglib.load(spec, [pair])
  except cfglib.ConfigError:
    return False
  return True


def override_args(pairs: Sequence[tuple[str, str]]) -> list[str]:
  return [f"--config.{k}={v}" for k, v in pairs]


def sweepdir(out: Path, problem: Problem, preset: str,
             pairs: Sequence[tuple[str, str]] = ()) -> Path:
  """``<out>/<config>_<preset>[_<hash of the overrides it accepts>]``: runs with other
  overrides never land in (and are never skipped as done by) the same sweep."""
  tag = cfglib.fingerprint(applicable(problem, preset, pairs))
  return Path(out) / (f"{problem.config}_{preset or 'paper'}" + (f"_{tag}" if tag else ""))


def selection(problems: str, solvers: str) -> list[tuple[Problem, list[str]]]:
  """[(problem, solvers to train on it)] for ``--problems`` / ``--solvers`` subsets."""
  want = {p.strip() for p in problems.split(",") if p.strip()}
  unknown = want - {p.key for p in PROBLEMS} - {p.config for p in PROBLEMS}
  if unknown:
    raise SystemExit(f"error: unknown problem(s) {sorted(unknown)}; choose from "
                     f"{', '.join(p.key for p in PROBLEMS)}")
  only = {s.strip() for s in solvers.split(",") if s.strip()}
  every = {s for p in PROBLEMS for s in p.solvers}
  if only - every:
    raise SystemExit(f"error: solver(s) {sorted(only - every)} are not in Table 2; choose "
                     f"from {', '.join(sorted(every))}")
  out = []
  for p in PROBLEMS:
    if p.key in want or p.config in want:
      chosen = [s for s in p.solvers if not only or s in only]
      if chosen:
        out.append((p, chosen))
  return out


def run_sweeps(args, pairs) -> list[str]:
  """One sweep per selected problem, with the overrides its config accepts."""
  return [common.run_sweep(config_spec(p, args.preset), solvers, args.seeds,
                           sweepdir(args.out, p, args.preset, pairs),
                           override_args(applicable(p, args.preset, pairs)), args.workers,
                           metric=f"eval/{p.metric}", execute=not args.report_only)
          for p, solvers in selection(args.problems, args.solvers)]


# ----------------------------------------------------------------- what the runs used

def _length(c, n_train: int) -> str:
  if c.num_steps:
    return f"{c.num_steps} steps"
  spe = max(1, n_train // c.batch_size)
  return f"{c.num_epochs} epoch(s) = {c.num_epochs * spe} steps"


def protocol(problem: Problem, c) -> str:
  """The sizes of THIS table's runs of ``problem``, from its resolved config ``c``."""
  o, opt = c.problem_options, c.optimizer
  train_opt = f"{opt.name} lr {opt.learning_rate:g} ({opt.schedule})"
  if problem.key in ("ff", "deq"):
    n_train, n_test = o.train_examples or 50000, o.eval_examples or 10000
    data = (f"{n_train} training / {n_test} test images"
            + (", random crop + flip" if o.augment else ""))
    if problem.key == "ff":
      net = (f"conv {'/'.join(map(str, o.channels))} + dense "
             f"{'/'.join(map(str, o.hidden))}")
      relax = f"lcp controlled phase at most {c.solvers.lcp_di.controlled.max_steps} steps"
    else:
      net = f"DEQ block of {o.channels} channels, inner {o.inner_channels}, {o.groups} groups"
      relax = (f"free/adjoint fixed points at most {c.solvers.rbp.free.max_steps} steps, "
               f"lcp controlled phase at most {c.solvers.lcp_di.controlled.max_steps}")
    return (f"{net}; {data}; batch {c.batch_size}, {_length(c, n_train)}, {train_opt}; "
            f"{relax}")
  half = o.size // 2
  return (f"image `{o.image}` at {o.size}x{o.size} (trained on the {half}x{half} even grid, "
          f"PSNR on the full grid); {o.fourier_features} Fourier features (scale "
          f"{o.fourier_scale:g}), {o.hidden} hidden units; batch {c.batch_size} pixels, "
          f"{_length(c, half * half)}, {train_opt}")


def cifar_source_now(c) -> str:
  """Which CIFAR-10 copy ``problems/cifar.py`` would read now for config ``c``."""
  if c.problem_options.get("source", "files") == "tfds":
    return "TFDS (lossless)"
  where = c.data_dir or os.environ.get("BILEVEL_DATA_DIR", "")
  if not where:
    return "no data: neither data_dir nor $BILEVEL_DATA_DIR is set (the runs would fail)"
  root = Path(where).expanduser()
  if cifar10.pickle_dir(root) is not None:  # the loader's own test
    return f"the lossless python batches under {root}"
  if (root / "cifar10_jpeg_train.npz").is_file():
    return (f"the **LOSSY JPEG (q75) copy** in {root} (pixels differ from the original; "
            "not comparable with published CIFAR-10 numbers)")
  return f"nothing found under {root} (the runs would fail)"


def image_of(summary: dict) -> str:
  """The INR image a run fitted: its config.json, else its notes."""
  cfg = common.read_json(Path(summary.get("workdir", "")) / "config.json").get("config", {})
  name = (cfg.get("problem_options") or {}).get("image")
  if not name:
    m = re.search(r"ONE image \(([^,]+),", summary.get("notes", ""))
    name = m.group(1) if m else "?"
  if name == "grace_hopper":
    return "grace_hopper (matplotlib sample data, the fallback)"
  if "/" in name or Path(name).suffix:
    return f"{name} (image file)"
  return f"{name} (scikit-image sample)" if name != "?" else "unknown"


def is_lossy(summary: dict) -> bool:
  return "LOSSY" in (summary.get("notes") or "")


# ----------------------------------------------------------------- the table

def collect(out: Path, preset: str, pairs) -> dict:
  """{(method, problem key): [completed summaries]} over every column of the table."""
  found = {}
  for p in PROBLEMS:
    where = sweepdir(out, p, preset, pairs)
    for label, by_problem in METHODS:
      if p.key in by_problem:
        found[(label, p.key)] = common.completed_summaries(where, by_problem[p.key])
  return found


def values(problem: Problem, summaries: list[dict]) -> list[float]:
  return [problem.scale * s["eval"][problem.metric] for s in summaries
          if common.is_finite(s["eval"].get(problem.metric))]


def cell(label: str, problem: Problem, summaries: list[dict]) -> str:
  """``'paper / ours mean ± std (n seeds)'``."""
  paper = PAPER.get((label, problem.key))
  paper_text = f"{paper:.2f}" if paper is not None else "-"
  vals = values(problem, summaries)
  if not vals:
    return f"{paper_text} / --"
  n = len(vals)
  mark = f" {LOSSY_MARK}" if any(is_lossy(s) for s in summaries) else ""
  return (f"{paper_text} / {common.format_mean_std(vals)} "
          f"({n} seed{'s' if n > 1 else ''}){mark}")


def _first_line(text: str, limit: int = 240) -> str:
  line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
  return line if len(line) <= limit else line[:limit] + " ..."


def report(out: Path, preset: str, seeds: str, chosen: list[tuple[Problem, list[str]]],
           overrides: Sequence[str], pairs, commands: Sequence[str],
           this_command: str, machine: Optional[str] = None) -> str:
  """The markdown of Table 2 from the summaries under ``out``."""
  found = collect(out, preset, pairs)
  accepted = {p.key: applicable(p, preset, pairs) for p in PROBLEMS}
  configs = {p.key: cfglib.load(config_spec(p, preset), accepted[p.key]) for p in PROBLEMS}
  quick = "quick" in preset.split("+")
  over = f" with overrides `{' '.join(overrides)}`" if overrides else ""
  lines = ["# Table 2: CIFAR-10 test accuracy (%) and INR PSNR (dB), paper vs ours", ""]
  if quick:
    lines += [f"**CPU smoke-scale run (preset `{preset}`{over}), NOT the paper's protocol.** "
              "Small networks, CIFAR-10 subsets, short training, one small image (sizes "
              "below): these numbers show that every solver trains end to end on a CPU; "
              "they do not reproduce Table 2, which needs the paper-scale configs "
              "(`--preset paper`) on an accelerator.", ""]
  elif overrides:
    lines += [f"**Preset `{preset}`{over}: the overrides change the protocol; not the "
              "paper's.**", ""]
  lines += ["Protocol of THIS table (sizes from the configs as resolved for these runs):", ""]
  for p in PROBLEMS:
    mine = override_args(accepted[p.key])
    lines.append(f"- {p.column} (`{config_spec(p, preset)}`"
                 + (f" with `{' '.join(mine)}`" if mine else "")
                 + f"): {protocol(p, configs[p.key])}")

  # Data provenance: what the runs say (their notes), else what they would use now.
  lines += ["", "Data:", ""]
  lossy_any = False
  for p in PROBLEMS[:2]:
    runs = [s for (label, key), ss in found.items() if key == p.key for s in ss]
    notes = sorted({s.get("notes") or "(no notes)" for s in runs})
    lossy_any |= any(is_lossy(s) for s in runs)
    if runs:
      lines.append(f"- {p.column}: the runs' notes: " + "; ".join(f"\"{n}\"" for n in notes))
    else:
      lines.append(f"- {p.column}: no completed run; data now: "
                   f"{cifar_source_now(configs[p.key])}")
  if lossy_any:
    lines.append(f"- **{LOSSY_MARK} CIFAR-10 results marked {LOSSY_MARK} were made on the "
                 "LOSSY JPEG (q75) copy of CIFAR-10**: its pixels differ from the original "
                 "data set, so they are not comparable with the paper's (or any published) "
                 "CIFAR-10 numbers.")
  inr_runs = [s for (label, key), ss in found.items() if key == "inr" for s in ss]
  if inr_runs:
    images = sorted({image_of(s) for s in inr_runs})
    lines.append(f"- INR: ONE image per run, {', '.join(images)}; the paper averages over a "
                 "data set of natural images. The runs' notes: "
                 + "; ".join(f"\"{n}\"" for n in sorted({s.get('notes', '') for s in inr_runs})))
  else:
    lines.append(f"- INR: no completed run; the config fits ONE image, "
                 f"`{configs['inr'].problem_options.image}` (scikit-image sample; "
                 "`--config.problem_options.image=grace_hopper` is the fallback without "
                 "scikit-image); the paper averages over a data set of natural images.")

  lines += ["", "Each cell: paper / ours, ours = mean ± std over the seeds that completed "
            "(std over seeds, shown for 2 or more). C10: test accuracy (%) at the free "
            "equilibrium after the last step; INR: PSNR (dB) on the full pixel grid. "
            "BP / RBP is the reference: BP for the feedforward net, RBP for the DEQ and "
            "the INR. n/a: not in the paper's table.", "",
            "| Method | " + " | ".join(f"{p.column}: paper / ours" for p in PROBLEMS) + " |",
            "|---|" + "---|" * len(PROBLEMS)]
  for label, by_problem in METHODS:
    row = [label] + [cell(label, p, found.get((label, p.key), [])) if p.key in by_problem
                     else "n/a" for p in PROBLEMS]
    lines.append("| " + " | ".join(row) + " |")

  # Every run of the table's sweeps, completed or not.
  requested = {(p.key, s): common.parse_seeds(seeds) for p, ss in chosen for s in ss}
  detail = ["", "## Runs", "",
            "| Column | Method | solver | seed | status | steps | metric | also "
            "| s/step (median) | wall time (s) |", "|" + "---|" * 10]
  header_rows = len(detail)
  missing = []
  for p in PROBLEMS:
    where = sweepdir(out, p, preset, pairs)
    for label, by_problem in METHODS:
      solver = by_problem.get(p.key)
      if solver is None:
        continue
      dirs = {path.parent for path in common.summary_paths(where, solver)}
      dirs |= {d for _, d in common.run_dirs(where, solver, requested.get((p.key, solver), []))}
      for d in sorted(dirs, key=common.run_order):
        s = common.read_json(d / "summary.json")
        status, reason = common.run_status(d)
        seed = s.get("seed", d.name[4:])
        if status != "completed":
          missing.append(f"- {p.column} / {solver} / seed {seed} (`{common.display_path(d)}`): "
                         f"{status}" + (f" -- {_first_line(reason)}" if reason else ""))
          if not s:
            continue
        ev = s.get("eval") or {}
        val = values(p, [s]) if status == "completed" else []
        metric = f"{val[0]:.2f}" if val else "--"
        if p.key == "inr":
          also = (f"held-out {ev['psnr_heldout']:.2f} dB, train {ev['psnr_train']:.2f} dB"
                  if common.is_finite(ev.get("psnr_heldout")) and
                  common.is_finite(ev.get("psnr_train")) else "")
        else:
          also = (f"free conv. {ev['free/converged_fraction']:.2f}"
                  if common.is_finite(ev.get("free/converged_fraction")) else "")
        if is_lossy(s):
          also = (also + "; " if also else "") + f"LOSSY JPEG {LOSSY_MARK}"
        sps, wall = s.get("seconds_per_step"), s.get("wall_time_s")
        detail.append(f"| {p.column} | {label} | {solver} | {seed} | {status} | "
                      f"{s.get('steps')}/{s.get('total_steps')} | {metric} | {also} | "
                      f"{f'{sps:.4f}' if common.is_finite(sps) else '-'} | "
                      f"{f'{wall:.0f}' if common.is_finite(wall) else '-'} |")
  if len(detail) == header_rows:
    detail.append("| (no run directory yet) | | | | | | | | | |")
  lines += detail + ["", "## Did not complete", ""]
  lines += missing or ["- nothing: every requested run completed."]
  chosen_pairs = {(q.key, s) for q, ss in chosen for s in ss}
  not_chosen = [f"{p.column} {s}" for p in PROBLEMS for s in p.solvers
                if (p.key, s) not in chosen_pairs]
  if not_chosen:
    lines.append(f"- not requested by this command: {', '.join(not_chosen)} (their cells "
                 "show what is already under the output directory, if anything).")
  if machine is None:
    info = common.machine_info()
    machine = f"{common.machine_description(info)}, {info['device_count']} device(s)"
  lines += ["", "## How it ran", "",
            f"- this file: `{this_command}`",
            "- the sweeps behind it (resumable; re-run to finish missing seeds):"]
  lines += [f"  - `{c}`" for c in commands] or ["  - (none selected)"]
  lines += [f"- CIFAR-10 data directory: $BILEVEL_DATA_DIR="
            f"`{os.environ.get('BILEVEL_DATA_DIR') or '(unset)'}` (unless --config.data_dir)",
            f"- machine: {machine}",
            f"- written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
  return "\n".join(lines)


def _check(args, pairs, chosen) -> str:
  """What is wrong with the command line ('' if nothing), before anything runs."""
  if not chosen:
    return (f"nothing to do: none of --solvers {args.solvers} is trained on --problems "
            f"{args.problems}")
  try:
    common.parse_seeds(args.seeds)
    for q in PROBLEMS:  # the report reads every column's config
      cfglib.load(config_spec(q, args.preset))
    for pair in pairs:  # an override that no selected config accepts is a mistake
      if not any(_accepts(config_spec(q, args.preset), tuple(pair)) for q, _ in chosen):
        cfglib.load(config_spec(chosen[0][0], args.preset), [pair])
  except (cfglib.ConfigError, ValueError) as e:
    return str(e)
  return ""


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, pairs, rest = common.split_overrides(argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="quick",
                 help="config preset: quick (CPU smoke scale), paper (the configs' defaults), "
                      "or any preset the configs know, e.g. quick+anderson")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, or a range 0-2")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--out", type=Path, default=ROOT / "runs" / "table2",
                 help="where the sweeps go (one directory per problem)")
  p.add_argument("--results", type=Path,
                 default=ROOT / "benchmarks" / "results" / "table2_cifar_inr.md")
  p.add_argument("--problems", default="ff,deq,inr", help="subset of ff,deq,inr to train")
  p.add_argument("--solvers", default="",
                 help="subset of bp,rbp,lcp_di,lcp_kp to train (default: all)")
  p.add_argument("--report_only", action="store_true")
  args = p.parse_args(rest)
  args.out = args.out.absolute()
  chosen = selection(args.problems, args.solvers)
  problem = _check(args, pairs, chosen)
  if problem:
    p.error(problem)
  commands = run_sweeps(args, pairs)
  text = report(args.out, args.preset, args.seeds, chosen, overrides, pairs, commands,
                shlex.join(["python", "-m", "benchmarks.table2_cifar_inr", *argv]))
  atomic_write_text(args.results, text)
  print(text)
  print(f"wrote {args.results}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
