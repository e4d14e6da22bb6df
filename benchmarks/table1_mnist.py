#!/usr/bin/env python
"""Table 1 of the paper: MNIST test accuracy of every learning circuit, FF and RNN.

    python -m benchmarks.table1_mnist --preset fast --seeds 0,1,2 --workers 2

trains the 5 methods x {FF, RNN} with ``launch/sweep.py`` (one sweep per
network; resumable: re-running the command finishes or extends what is there)
and writes ``benchmarks/results/table1_mnist.md``: mean +- std over the seeds
that completed, next to the paper's numbers, with the exact commands, the
machine and what ran. ``--report_only`` only rebuilds the table from finished
runs; extra ``--config.KEY=VALUE`` arguments go to every run (e.g.
``--config.num_epochs=5`` for a shorter run, labelled as such in the table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from benchmarks import common
from launch.records import atomic_write_text

METHODS = (("LCP - LF", "lcp_lf", "lcp_lf"), ("LCP - DI", "lcp_di", "lcp_di"),
           ("LCP - DI (KP)", "lcp_kp", "lcp_kp"), ("LCP - EBD", "lcp_ebd", "lcp_ebd"),
           ("BP/RBP", "bp", "rbp"))
# Paper, Table 1: (mean, std) test accuracy (%) over 3 seeds.
PAPER = {"LCP - LF": ((97.73, 0.07), (97.70, 0.11)), "LCP - DI": ((98.11, 0.07), (97.58, 0.12)),
         "LCP - DI (KP)": ((98.14, 0.09), (97.75, 0.11)),
         "LCP - EBD": ((98.00, 0.03), (97.60, 0.15)), "BP/RBP": ((98.29, 0.14), (97.87, 0.19))}
NETS = (("FF", "mnist_ff", 0), ("RNN", "mnist_rnn", 1))


def sweepdir(out: Path, config: str, preset: str) -> Path:
  return out / f"{config}_{preset}"


def selected(args):
  nets = [n for n in NETS if n[0].lower() in args.nets.lower().split(",")]
  methods = [m for m in METHODS if not args.methods or set(m[1:]) & set(args.methods.split(","))]
  return nets, methods


def run_sweeps(args, overrides: list[str]) -> list[str]:
  commands = []
  nets, methods = selected(args)
  for _, config, col in nets:
    commands.append(common.run_sweep(
        f"{config}:{args.preset}" if args.preset != "paper" else config,
        [m[1 + col] for m in methods], args.seeds, sweepdir(args.out, config, args.preset),
        overrides, args.workers, execute=not args.report_only))
  return commands


def collect(args, preset: str) -> dict:
  """{(net, method): [summary, ...]} from the sweeps' run directories."""
  found: dict = {}
  for net, config, col in NETS:
    for label, *names in METHODS:
      summaries = common.completed_summaries(sweepdir(args.out, config, preset), names[col])
      if summaries:
        found[(net, label)] = summaries
  return found


def _accs(summaries: list[dict]) -> list[float]:
  return [100 * s["eval"]["test/accuracy"] for s in summaries]


def report(args, commands: list[str], overrides: list[str]) -> str:
  found = collect(args, args.preset)
  lines = ["# Table 1: MNIST test accuracy (%), mean ± std over seeds", "",
           f"Preset `{args.preset}`" + (f", overrides `{' '.join(overrides)}`" if overrides
                                        else "") + ". Test accuracy on the 10k test set at "
           "the free equilibrium after the last epoch. Paper: Table 1 (3 seeds).", "",
           "| Method | FF (ours) | FF (paper) | Δ FF | RNN (ours) | RNN (paper) | Δ RNN |",
           "|---|---|---|---|---|---|---|"]
  detail = ["", "## Runs", "", "| Net | Method | solver | seeds | epochs | test acc. per seed "
            "| s/step (median) |", "|---|---|---|---|---|---|---|"]
  for label, *names in METHODS:
    row = [label]
    for net, _, col in NETS:
      summaries = found.get((net, label), [])
      accs = _accs(summaries)
      text = common.format_mean_std(accs)
      paper = PAPER[label][col]
      delta = f"{statistics.mean(accs) - paper[0]:+.2f}" if accs else "--"
      row += [text, f"{paper[0]:.2f} ± {paper[1]:.2f}", delta]
    lines.append("| " + " | ".join(row) + " |")
  for net, _, col in NETS:
    for label, *names in METHODS:
      summaries = found.get((net, label), [])
      if summaries:
        accs = _accs(summaries)
        epochs = sorted({round(s["epochs"], 2) for s in summaries})
        secs = common.median_or_nan(s["seconds_per_step"] for s in summaries)
        detail.append(f"| {net} | {label} | {names[col]} | "
                      f"{','.join(str(s['seed']) for s in summaries)} | "
                      f"{','.join(str(e) for e in epochs)} | "
                      f"{', '.join(f'{a:.2f}' for a in accs)} | {secs:.4f} |")
  for other in ("paper", "fast"):
    extra = collect(args, other) if other != args.preset else {}
    if extra:
      detail += ["", f"### Preset `{other}` (same method, other relaxation settings)", "",
                 "| Net | Method | seeds | epochs | test acc. per seed | s/step (median) |",
                 "|---|---|---|---|---|---|"]
      for (net, label), summaries in sorted(extra.items()):
        accs = _accs(summaries)
        detail.append(f"| {net} | {label} | {','.join(str(x['seed']) for x in summaries)} | "
                      f"{','.join(str(round(x['epochs'], 2)) for x in summaries)} | "
                      f"{', '.join(f'{a:.2f}' for a in accs)} | "
                      f"{common.median_or_nan(x['seconds_per_step'] for x in summaries):.4f} |")
  m = common.machine_info()
  lines += detail + ["", "## How it ran", "",
                     f"- this file: `python -m benchmarks.table1_mnist {' '.join(sys.argv[1:])}`",
                     "- the sweeps behind it (resumable; re-run to finish missing seeds):"] + [
                     f"  - `{c}`" for c in commands] + [
      f"- machine: {m['cores']}-core CPU ({m['cpu_model']}), shared with other jobs; "
      f"jax {m['jax_version']}, {m['backend']}, float32",
      f"- written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
  lines += [n + "\n" for n in args.note]
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, _, rest = common.split_overrides(argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="fast", choices=("fast", "paper", "quick"))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--out", type=Path, default=ROOT / "runs" / "table1")
  p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "table1_mnist.md")
  p.add_argument("--nets", default="ff,rnn", help="subset of ff,rnn to train")
  p.add_argument("--methods", default="", help="subset of solvers to train (default: all)")
  p.add_argument("--report_only", action="store_true")
  p.add_argument("--note", action="append", default=[],
                 help="a paragraph appended to the results file (repeatable)")
  args = p.parse_args(rest)
  commands = run_sweeps(args, overrides)
  text = report(args, commands, overrides)
  atomic_write_text(args.results, text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
