#!/usr/bin/env python
"""Table 3 (Omniglot, complex synapses) -> benchmarks/results/table3_omniglot.md.

    python -m benchmarks.table3_omniglot --config omniglot:cpu --seeds 0,1,2   # 2-core CPU
    python -m benchmarks.table3_omniglot --config omniglot --seeds 0,1,2       # paper scale (GPU)
    python -m benchmarks.table3_omniglot --config omniglot:cpu --seeds 0,1,2 --report_only \
        --sweepdir benchmarks/results/table3_omniglot_cpu/main \
        --variant "lcp, alpha sweep=benchmarks/results/table3_omniglot_cpu/alpha"

Runs every solver through ``launch/sweep.py`` (one ``launch/run.py`` per solver
and seed, resumable), then writes:

* the protocol of the measured table (data recipe, net, inner loop, budgets);
* the same-protocol table: every solver on the same data, inner loop and
  budgets -- meta-test accuracy (mean over seeds of the mean over test tasks,
  the mean 95% interval half-width over tasks, the std over seeds), seconds per
  meta-step and minutes per run, and every phase's converged fraction and
  residual reduction at the end of training, so that an equilibrium method
  read off a non-equilibrium is visible as such;
* variant rows (``--variant LABEL=SWEEPDIR``: one row per solver and grid cell);
* the paper's Table 3 split by where each number comes from (run by the paper
  on the complex-synapse inner loop, or quoted from another protocol).

A "no meta-training" row evaluates the initial slow weights (the inner loop
alone), so that what meta-learning adds is visible next to chance (1/n_way).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent

import jax
import numpy as np

import problems
from launch import config as cfglib
from launch import records

from benchmarks import common

# Table 3 of the paper: mean +- std test accuracy (%) over 3 seeds, 20-way 1-shot, and
# where each number comes from (docs/omniglot_protocol.md).
QUOTED = "quoted: the iMAML paper's protocol (rotated classes at meta-test, short inner loop)"
PAPER = {"fomaml": ("FOMAML", "89.40 ± 0.50", QUOTED),
         "t1t2": ("T1-T2", "89.72 ± 0.43",
                  "not stated in the paper copy (cited [75]; listed with the quoted "
                  "first-order baselines)"),
         "reptile": ("Reptile", "89.43 ± 0.14", QUOTED),
         "lcp": ("LCP", "91.00 ± 0.24", "run by the paper: complex-synapse inner loop, CML "
                 "recipe"),
         "imaml": ("iMAML", "94.46 ± 0.42", QUOTED),
         "cml": ("CML", "94.16 ± 0.12", "run on the complex-synapse inner loop (CML recipe)"),
         "rbp": ("RBP (implicit, fixed-point adjoint)", "-", "not in the paper"),
         "bp": ("BP through the inner loop (MAML)", "-", "not in the paper")}
ORDER = ("fomaml", "t1t2", "reptile", "lcp", "imaml", "cml", "rbp", "bp")
PHASES = ("free", "controlled", "adjoint", "nudged_plus", "nudged_minus")


def _init_row(config_spec: str, pairs: list[tuple[str, str]]) -> dict:
  """Meta-test accuracy of the untrained initial weights (seed 0)."""
  config = cfglib.load(config_spec, pairs)
  config.solver = "fomaml"  # same free relaxation (inner loop) for every solver
  task = problems.make_task(config)
  params = task.problem.init_params(jax.random.key(config.seed), task.example)
  return task.evaluate(params, cfglib.build_solver(config))


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def _phases(runs: list[dict]) -> str:
  """``free 0.00 / 7e-02; controlled ...``: converged fraction / residual reduction of
  every phase in the last training window, mean over runs."""
  out = []
  for phase in PHASES:
    conv = [r["train"].get(f"{phase}/converged_fraction") for r in runs]
    red = [r["train"].get(f"{phase}/residual_reduction") for r in runs]
    if None not in conv and None not in red:
      out.append(f"{phase} {np.mean(conv):.2f} / {np.mean(red):.0e}")
  return "; ".join(out) or "-"


def _row(label: str, runs: list[dict]) -> str:
  """One measured row: accuracy, spread, seeds, time, phases, inner residual at test."""
  acc = np.array([r["eval"]["test_accuracy"] for r in runs])
  ci = np.mean([r["eval"]["test_accuracy_ci95"] for r in runs])
  std = _pct(common.mean_std(list(acc))[1]) if len(acc) > 1 else "-"
  sps = np.mean([r.get("seconds_per_step", float("nan")) for r in runs])
  wall = np.mean([r.get("wall_time_s", float("nan")) for r in runs]) / 60
  res = (np.mean([r["eval"]["test_free_residual"] for r in runs]),
         np.max([r["eval"]["test_free_residual_max"] for r in runs]))
  return (f"| {label} | {_pct(acc.mean())} ± {_pct(ci)} | {std} | {len(runs)} | {sps:.2f} | "
          f"{wall:.1f} | {_phases(runs)} | {res[0]:.2f} / {res[1]:.2f} |")


HEADER = ["| method | test acc. (%) ± 95% CI | std over seeds | seeds | s / meta-step | "
          "min / run | phases, end of training: converged fraction / residual reduction | "
          "inner residual ‖f‖ at test (mean / max) |",
          "|---|---:|---:|---:|---:|---:|---|---:|"]


def _variant_rows(label: str, sweepdir: Path) -> list[str]:
  """One row per solver and grid cell of another sweep directory."""
  rows = []
  for solver_dir in sorted((Path(sweepdir) / "runs").glob("*")):
    cells = {}
    for path in common.summary_paths(sweepdir, solver_dir.name):
      s = common.read_json(path)
      if s.get("status") == "completed" and s.get("eval"):
        cells.setdefault(path.parent.parent.name, []).append(s)
    rows += [_row(f"{label}: `{solver_dir.name}` {cell}", runs)
             for cell, runs in sorted(cells.items())]
  return rows or [f"| {label} | (no completed run in `{sweepdir}`) | | | | | | |"]


CURVES = (("loss", "query loss at phi*"), ("accuracy", "query accuracy at phi*"),
          ("H", "H = ½‖u‖² (lcp)"), ("controlled_loss", "query loss at the controlled "
                                                           "state (lcp)"))


def _curve_rows(sweepdir: Path, solvers: list[str]) -> list[str]:
  """First and last training window of each solver's curves (``metrics.jsonl`` beside
  the summaries), mean over seeds: whether meta-training lowered the query loss at
  the free equilibrium, which a rule can fail to do while lowering its own objective."""
  rows = ["| method | seeds | " + " | ".join(f"{name}: first → last window"
                                            for _, name in CURVES) + " |",
          "|---|---:|" + "---:|" * len(CURVES)]
  for solver in solvers:
    files = [p.with_name("metrics.jsonl") for p in common.summary_paths(sweepdir, solver)]
    curves = [[r for r in records.read_jsonl(f) if r.get("split") == "train"]
              for f in files if f.exists()]
    curves = [c for c in curves if c]
    if not curves:
      continue
    cells = []
    for key, _ in CURVES:
      ends = [(c[0][key], c[-1][key]) for c in curves if key in c[0] and key in c[-1]]
      cells.append(f"{np.mean([a for a, _ in ends]):.3g} → {np.mean([b for _, b in ends]):.3g}"
                   if ends else "-")
    rows.append(f"| `{solver}` | {len(curves)} | " + " | ".join(cells) + " |")
  return rows


def _protocol(spec: str, config) -> list[str]:
  o = config.problem_options
  free = config.solvers.lcp.free
  recipe = {"cml": "the CML recipe (meta-train: 30 background alphabets with 90/180/270-degree "
                   "rotations as new classes; meta-test: the 20 evaluation alphabets, "
                   "unrotated; bilinear resize; docs/omniglot_protocol.md)",
            "vinyals": "the Vinyals split with rotations as classes at meta-train AND "
                       "meta-test (docs/omniglot_protocol.md)"}[o.protocol]
  steps = config.num_steps or config.num_epochs * o.steps_per_epoch
  lines = [f"Protocol of the measured table (config `{spec}`): data: {recipe}. {o.n_way}-way "
           f"{o.k_shot}-shot, {o.image_size}x{o.image_size}, conv-4 `{o.net}` with "
           f"{o.channels} channels and per-task batch norm, lambda = {o.lam}; inner loop "
           f"{free.max_steps} SGD steps (lr {free.strategy_options.learning_rate}, Nesterov "
           f"momentum {free.strategy_options.momentum}, early stop at rtol {free.rtol}); "
           f"meta-batch {config.batch_size}, {steps} meta-steps, outer Adam lr "
           f"{config.optimizer.learning_rate}, Polyak averaging from epoch "
           f"{config.optimizer.polyak_start_epoch}; {o.n_query} query images per class in "
           f"training; meta-test on {o.eval_tasks} test tasks with {o.eval_n_query} query "
           f"images per class. Chance = {100 / o.n_way:.1f}%. Every solver's options: "
           f"`python launch/run.py --config {spec} --print_config`.", ""]
  if spec.endswith(":quick"):
    lines += ["**These are CPU quick-preset numbers (a smoke test of every solver in a few "
              "minutes each), NOT a reproduction of the paper's numbers.**", ""]
  return lines


def _paper_section() -> list[str]:
  lines = ["## The paper's Table 3, by where each number comes from", "",
           "20-way 1-shot, conv-4 with 64 channels, mean ± std over 3 seeds.", "",
           "| method | paper (%) | where the number comes from |", "|---|---:|---|"]
  lines += [f"| {name} | {acc} | {src} |" for name, acc, src in
            (PAPER[k] for k in ORDER if PAPER[k][1] != "-")]
  return lines + ["", "What the paper claims: LCP above the single-phase first-order "
                  "methods (FOMAML, T1-T2, Reptile) and below iMAML and CML. Only CML > LCP "
                  "compares two numbers made on the same inner loop and data; LCP against "
                  "FOMAML, Reptile and iMAML compares numbers from different protocols.", ""]


def _report(args, pairs, overrides, solvers, variants) -> list[str]:
  """The whole results file, as lines."""
  config = cfglib.load(args.config, pairs)
  command = (f"python -m benchmarks.table3_omniglot --config {args.config} --seeds "
             f"{args.seeds} --solvers {args.solvers} --sweepdir {args.sweepdir}"
             + "".join(f' --variant "{v}"' for v in args.variant)
             + (" --report_only" if args.report_only else "")
             + (" --no_init_row" if args.no_init_row else "")
             + "".join(" " + x for x in overrides) + " --note ..." * len(args.note))
  lines = ["# Table 3: meta-learning complex synapses on Omniglot", "",
           f"Command: `{command}` (the notes are the paragraphs at the end)", "",
           f"Machine: {common.machine_description()}; each run's summary.json is under "
           f"`{args.sweepdir}`.", ""] + _protocol(args.config, config)
  lines += ["## Same protocol: every solver on the same data, inner loop and budgets", ""]
  lines += HEADER
  for name in [n for n in ORDER if n in solvers] + [n for n in solvers if n not in ORDER]:
    runs = common.completed_summaries(args.sweepdir, name)
    label = f"{PAPER.get(name, (name,))[0]} (`{name}`)"
    lines.append(_row(label, runs) if runs else f"| {label} | (no completed run) "
                 "| | | | | | |")
  if not args.no_init_row:
    init = _init_row(args.config, pairs)
    lines.append(f"| no meta-training (initial weights + inner loop) | "
                 f"{_pct(init['test_accuracy'])} ± {_pct(init['test_accuracy_ci95'])} | - | "
                 f"1 | - | - | - | {init['test_free_residual']:.2f} / "
                 f"{init['test_free_residual_max']:.2f} |")
  curves = _curve_rows(args.sweepdir, solvers)
  if len(curves) > 2:
    lines += ["", "## Training curves (meta-training tasks, first and last logging window)",
              ""] + curves
  if variants:
    lines += ["", "## Variants (same protocol, other solver options)", ""] + HEADER
    for label, sweepdir in variants:
      lines += _variant_rows(label, Path(sweepdir))
  lines += ["", "Accuracy: mean over seeds of the mean query accuracy over the meta-test "
            "tasks; ± is the 95% interval half-width over tasks (1.96 standard errors), "
            "averaged over seeds. Phases: the last training window's converged fraction "
            "and ||F_end|| / ||F_start||, averaged over seeds.", ""]
  return lines + _paper_section() + [n + "\n" for n in args.note]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="omniglot:quick")
  p.add_argument("--solvers", default=",".join(ORDER))
  p.add_argument("--seeds", default="0")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--sweepdir", type=Path, default=None)
  p.add_argument("--variant", action="append", default=[], metavar="LABEL=SWEEPDIR",
                 help="rows from another sweep directory (repeatable)")
  p.add_argument("--export", type=Path, default=None,
                 help="also copy every run's summary.json here (e.g. under benchmarks/results/)")
  p.add_argument("--report_only", action="store_true")
  p.add_argument("--no_init_row", action="store_true")
  p.add_argument("--note", action="append", default=[],
                 help="a paragraph appended under the tables (repeatable)")
  p.add_argument("--out", type=Path, default=_ROOT / "benchmarks/results/table3_omniglot.md")
  overrides, pairs, rest = common.split_overrides(sys.argv[1:] if argv is None else argv)
  args, bad = p.parse_known_args(rest)
  if bad:
    p.error(f"unknown arguments {bad} (only --config.KEY=VALUE overrides pass through)")
  variants = [v.split("=", 1) for v in args.variant]
  if any(len(v) != 2 for v in variants):
    p.error("--variant takes LABEL=SWEEPDIR")
  solvers = args.solvers.split(",")
  args.sweepdir = args.sweepdir or _ROOT / "runs" / "sweeps" / args.config.replace(":", "_")
  t0 = time.time()
  common.run_sweep(args.config, solvers, args.seeds, args.sweepdir, overrides, args.workers,
                   metric="eval/test_accuracy", execute=not args.report_only)
  if args.export:
    print(f"exported {len(common.export_summaries(args.sweepdir, args.export))} summaries")

  lines = _report(args, pairs, overrides, solvers, variants)
  lines.append(f"Generated in {time.time() - t0:.0f} s.")
  records.atomic_write_text(args.out, "\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
