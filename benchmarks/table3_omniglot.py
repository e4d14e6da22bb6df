#!/usr/bin/env python
"""Table 3 (Omniglot 20-way 1-shot, complex synapses) -> benchmarks/results/table3_omniglot.md.

    python -m benchmarks.table3_omniglot                       # quick preset, all solvers (CPU)
    python -m benchmarks.table3_omniglot --config omniglot --seeds 0,1,2   # paper scale (GPU)
    python -m benchmarks.table3_omniglot --report_only          # re-tabulate finished runs

Runs every solver through ``launch/sweep.py`` (one ``launch/run.py`` per solver
and seed, resumable), then tabulates the meta-test accuracy (mean over seeds of
the accuracy on the test-split tasks, with the mean 95% interval half-width over
tasks and the std over seeds), the 20 official one-shot runs, and the time per
meta-step, next to the paper's Table 3. A "no meta-training" row evaluates the
initial slow weights (the inner loop alone), so that what meta-learning adds is
visible next to chance (1/n_way).
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
from launch.records import atomic_write_text

from benchmarks import common

# Table 3 of the paper: mean +- std test accuracy (%) over 3 seeds, 20-way 1-shot.
PAPER = {"fomaml": ("FOMAML", "89.40 ± 0.50"), "t1t2": ("T1-T2", "89.72 ± 0.43"),
         "reptile": ("Reptile", "89.43 ± 0.14"), "lcp": ("LCP", "91.00 ± 0.24"),
         "imaml": ("iMAML", "94.46 ± 0.42"), "cml": ("CML", "94.16 ± 0.12"),
         "rbp": ("RBP (implicit, fixed-point adjoint)", "-"),
         "bp": ("BP through the inner loop (MAML)", "-"),
         "lcp_alpha1": ("LCP, alpha = 1 (earlier default)", "-")}
ORDER = ("fomaml", "t1t2", "reptile", "lcp", "imaml", "cml", "rbp", "bp")


def _init_row(config_spec: str, pairs: list[tuple[str, str]]) -> dict:
  """Meta-test accuracy of the untrained initial weights (seed 0)."""
  config = cfglib.load(config_spec, pairs)
  config.solver = "fomaml"  # same free relaxation (inner loop) for every solver
  task = problems.make_task(config)
  params = task.problem.init_params(jax.random.key(config.seed), task.example)
  return task.evaluate(params, cfglib.build_solver(config))


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="omniglot:quick")
  p.add_argument("--solvers", default=",".join(ORDER))
  p.add_argument("--seeds", default="0")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--sweepdir", type=Path, default=None)
  p.add_argument("--report_only", action="store_true")
  p.add_argument("--no_init_row", action="store_true")
  p.add_argument("--note", action="append", default=[],
                 help="a paragraph appended under the table (repeatable)")
  p.add_argument("--out", type=Path, default=_ROOT / "benchmarks/results/table3_omniglot.md")
  overrides, pairs, rest = common.split_overrides(sys.argv[1:] if argv is None else argv)
  args, bad = p.parse_known_args(rest)
  if bad:
    p.error(f"unknown arguments {bad} (only --config.KEY=VALUE overrides pass through)")
  solvers = args.solvers.split(",")
  label = args.config.replace(":", "_")
  args.sweepdir = args.sweepdir or _ROOT / "runs" / "sweeps" / label
  t0 = time.time()
  common.run_sweep(args.config, solvers, args.seeds, args.sweepdir, overrides, args.workers,
                   metric="eval/test_accuracy", execute=not args.report_only)

  config = cfglib.load(args.config, pairs)
  o = config.problem_options
  free = config.solvers.lcp.free
  lines = [
      "# Table 3: meta-learning complex synapses on Omniglot", "",
      f"Command: `python -m benchmarks.table3_omniglot --config {args.config} --seeds "
      f"{args.seeds} --solvers {args.solvers}"
      f"{' --report_only' if args.report_only else ''}{' --no_init_row' if args.no_init_row else ''}"
      f"{''.join(' ' + x for x in overrides)}{' --note ...' * len(args.note)}` "
      f"(the notes are the paragraphs under the table)", "",
      f"Machine: {common.machine_description()}; each run's summary.json is under "
      f"`{args.sweepdir}`.", "",
      f"Protocol of THIS table (config `{args.config}`): {o.n_way}-way {o.k_shot}-shot, "
      f"{o.image_size}x{o.image_size}, conv-4 with {o.channels} channels, lambda = {o.lam}, "
      f"inner loop {free.max_steps} SGD steps (lr "
      f"{free.strategy_options.learning_rate}, momentum "
      f"{free.strategy_options.momentum}), meta-batch {config.batch_size}, "
      f"{config.num_steps or config.num_epochs * o.steps_per_epoch} meta-steps, "
      f"{o.n_query} query image(s)/class in training, meta-test on {o.eval_tasks} "
      f"test-split tasks with {o.eval_n_query} query images/class. Chance = "
      f"{100 / o.n_way:.1f}%.", ""]
  if args.config.endswith(":quick"):
    lines += ["**These are CPU quick-preset numbers (a smoke test of every solver in a "
              "few minutes each), NOT a reproduction of the paper's numbers**, which need "
              "the paper-scale config (`--config omniglot`, 30 epochs x 125 meta-batches "
              "of 16 tasks, 64 channels, 200 inner steps) on an accelerator.", ""]
  lines += ["| method | paper (%, 3 seeds) | this run: test acc. (%) ± 95% CI | "
            "std over seeds | official 20 runs (%) | seeds | s / meta-step | "
            "inner residual ‖f‖ (test, mean / max) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name in [n for n in ORDER if n in solvers] + [n for n in solvers if n not in ORDER]:
    runs = common.completed_summaries(args.sweepdir, name)
    paper_name, paper = PAPER.get(name, (name, "-"))
    if not runs:
      lines.append(f"| {paper_name} (`{name}`) | {paper} | (no completed run) | | | | | |")
      continue
    acc = np.array([r["eval"]["test_accuracy"] for r in runs])
    ci = np.mean([r["eval"]["test_accuracy_ci95"] for r in runs])
    off = [r["eval"].get("official_runs_accuracy") for r in runs]
    off = _pct(np.mean(off)) if None not in off else "-"
    std = _pct(common.mean_std(list(acc))[1]) if len(acc) > 1 else "-"
    sps = np.mean([r.get("seconds_per_step", float("nan")) for r in runs])
    res = (np.mean([r["eval"]["test_free_residual"] for r in runs]),
           np.max([r["eval"]["test_free_residual_max"] for r in runs]))
    lines.append(f"| {paper_name} (`{name}`) | {paper} | {_pct(acc.mean())} ± {_pct(ci)} | "
                 f"{std} | {off} | {len(runs)} | {sps:.2f} | {res[0]:.2f} / {res[1]:.2f} |")
  if not args.no_init_row:
    init = _init_row(args.config, pairs)
    off = init.get("official_runs_accuracy")
    lines.append(f"| no meta-training (initial weights + inner loop) | - | "
                 f"{_pct(init['test_accuracy'])} ± {_pct(init['test_accuracy_ci95'])} | - | "
                 f"{_pct(off) if off is not None else '-'} | 1 | - | "
                 f"{init['test_free_residual']:.2f} / {init['test_free_residual_max']:.2f} |")
  lines += ["", "Accuracy: mean over seeds of the mean query accuracy over the meta-test "
            "tasks; ± is the 95% interval half-width over tasks (1.96 standard errors), "
            "averaged over seeds. The inner loop runs a fixed budget; its final residual "
            "‖f‖ = ‖∇E‖ is reported so that non-converged tasks are visible.",
            ""] + [n + "\n" for n in args.note] + [f"Generated in {time.time() - t0:.0f} s."]
  atomic_write_text(args.out, "\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
