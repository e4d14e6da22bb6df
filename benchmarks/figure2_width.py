#!/usr/bin/env python
"""Figure 2 of the paper: training loss L and amount of control ||psi*|| = sqrt(2H)
after training, against the width of an equilibrium RNN trained by LCP-DI on MNIST.

    python -m benchmarks.figure2_width --widths 16,32,64,128,256,512,1024 --epochs 8

trains ``mnist_rnn:<preset>`` with ``lcp_di`` at each width through
``launch/sweep.py`` (resumable) and plots, per width, the training
cross-entropy at the free equilibrium (on ``eval_train_examples`` training
examples after the last step) and ``sqrt(2H)`` with ``H = mean ||psi*||^2 / 2``
over the examples of the last logging window of training (the last
``log_every_steps`` batches).
Writes ``benchmarks/results/figure2_width.png`` and a markdown table next to it
(``figure2_width.md``) with the command and machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from launch.records import atomic_savefig, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--widths", default="16,32,64,128,256,512,1024")
  p.add_argument("--epochs", type=int, default=8)
  p.add_argument("--seeds", default="0")
  p.add_argument("--preset", default="fast")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--sweepdir", type=Path, default=ROOT / "runs" / "figure2")
  p.add_argument("--results", type=Path,
                 default=ROOT / "benchmarks" / "results" / "figure2_width.png")
  p.add_argument("--report_only", action="store_true")
  p.add_argument("--note", action="append", default=[],
                 help="a paragraph appended to the markdown file (repeatable)")
  args = p.parse_args([a for a in argv if not a.startswith("--config.")])

  cmd = [sys.executable, str(ROOT / "launch" / "sweep.py"), "--config",
         f"mnist_rnn:{args.preset}", "--solvers", "lcp_di", "--seeds", args.seeds,
         "--grid", f"problem_options.width={args.widths}", "--workers", str(args.workers),
         "--sweepdir", str(args.sweepdir), f"--config.num_epochs={args.epochs}",
         "--config.eval_every_epochs=0", "--config.problem_options.eval_train_examples=10000",
         *overrides]
  if not args.report_only:
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=False)

  points = []
  for path in sorted(args.sweepdir.glob("runs/lcp_di/*/seed*/summary.json")):
    s = json.loads(path.read_text())
    if s.get("status") != "completed":
      continue
    width = int(path.parent.parent.name.split("=")[-1])
    points.append((width, s["seed"], s["eval"]["train/cross_entropy"],
                   (2.0 * s["train"]["H"]) ** 0.5,
                   s["eval"]["train/accuracy"], s["eval"]["test/accuracy"],
                   s["train"].get("controlled/iterations", float("nan"))))
  points.sort()
  if not points:
    print("no completed runs yet", file=sys.stderr)
    return 1

  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  widths = sorted({p[0] for p in points})
  mean = lambda i, w: sum(p[i] for p in points if p[0] == w) / sum(p[0] == w for p in points)
  fig, ax = plt.subplots(figsize=(4.8, 3.4))
  ax.plot(widths, [mean(2, w) for w in widths], "o-", label="training loss $L$")
  ax.plot(widths, [mean(3, w) for w in widths], "s-", label=r"$\|\psi_*\| = \sqrt{2H}$")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("recurrent layer width")
  ax.set_title(f"MNIST RNN, LCP-DI, {args.epochs} epochs", fontsize=10)
  ax.legend()
  fig.tight_layout()
  atomic_savefig(fig, args.results, dpi=150)

  lines = ["# Figure 2: training loss and amount of control vs RNN width (LCP-DI)", "",
           f"![figure 2]({args.results.name})", "",
           "| width | seed | train CE (10k train ex.) | √(2H) (last 100 steps) | train acc. | "
           "test acc. | controlled iters |", "|---|---|---|---|---|---|---|"]
  for w, seed, ce, psi, tr, te, it in points:
    lines.append(f"| {w} | {seed} | {ce:.4f} | {psi:.4f} | {100 * tr:.2f} | {100 * te:.2f} "
                 f"| {it:.1f} |")
  lines += ["", f"- command: `python -m benchmarks.figure2_width {' '.join(argv)}`",
            f"- which ran: `python {' '.join(cmd[1:])}`",
            "- ‖ψ*‖ uses the authors' loss convention (CE / batch size per example, "
            "see configs/mnist_ff.py); L is the plain mean cross-entropy.",
            f"- machine: {common.machine_description()}, float32",
            f"- written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
  lines += [""] + [n + "\n" for n in args.note]
  atomic_write_text(args.results.with_suffix(".md"), "\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
