#!/usr/bin/env python
"""Per-step cost of every solver on the MNIST equilibrium networks (batch 64, real MNIST).

    python -m benchmarks.speed_mnist                # both nets, presets paper + fast
    python -m benchmarks.speed_mnist --nets rnn --presets fast --steps 50

For each (network, preset, solver): build the config exactly as
``launch/run.py --config mnist_<net>[:<preset>] --config.solver=<solver>`` does,
train ``--warmup_steps`` steps (so the timing is not at initialisation), then
time ``--steps`` jitted training steps (after compilation) in interleaved rounds
(every solver gets a few steps per round, so load changes on a shared machine
hit all of them alike). Reported: median wall-clock and CPU time per step, and
the fixed-point iterations per step -- the while-loop trip count, i.e. the
maximum over the batch, summed over the phases (free + controlled / adjoint),
as in the authors' solver loop. Writes ``benchmarks/results/speed_mnist.md``
next to the authors' PyTorch timings on this machine kind.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import jax
import numpy as np

import problems
from bilevel.train import data_mesh, init_train_state, make_train_step
from launch import config as cfglib
from launch import optim
from launch.records import atomic_write_text

SOLVERS = {"ff": ("bp", "rbp", "lcp_di", "lcp_kp", "lcp_ebd", "lcp_lf"),
           "rnn": ("rbp", "lcp_di", "lcp_kp", "lcp_ebd", "lcp_lf")}
# The authors' PyTorch code on a 2-core CPU, batch 64, real MNIST: median seconds per
# training step and fixed-point iterations per step (from the issue).
AUTHORS = {("ff", "bp"): (2.9e-3, None), ("ff", "lcp_di"): (0.130, 85),
           ("ff", "lcp_kp"): (0.107, 81), ("ff", "lcp_lf"): (1.72, 899),
           ("ff", "lcp_ebd"): (0.810, None), ("rnn", "rbp"): (0.022, 113),
           ("rnn", "lcp_di"): (1.08, 679), ("rnn", "lcp_ebd"): (0.211, None)}
LCP = ("lcp_di", "lcp_kp", "lcp_ebd", "lcp_lf")


def setup(net: str, preset: str, solver_name: str):

  spec = f"mnist_{net}" + ("" if preset == "paper" else f":{preset}")
  config = cfglib.load(spec, [("solver", solver_name),
                              ("problem_options.eval_train_examples", "0")])
  task = problems.make_task(config)
  solver = cfglib.build_solver(config)
  optimizer = optim.make_optimizer(cfglib.optimizer_config(config),
                                   config.num_epochs * task.steps_per_epoch,
                                   task.steps_per_epoch)
  mesh = data_mesh(1)
  state = init_train_state(task.problem, solver, optimizer, jax.random.key(0), task.example)
  step = make_train_step(task.problem, solver, optimizer, mesh=mesh)

  @jax.jit
  def trip_counts(params, solver_params, batch):
    stats = solver(task.problem, params, solver_params, batch, jax.random.key(0)).stats
    counts = {k: v.max() for k, v in stats.items() if k.endswith("/iterations")}
    if getattr(solver, "learn_q", False):  # lcp_lf: the noisy relaxation of the Q rule
      counts["q_learning/iterations"] = solver.noise_steps
    return counts

  return {"task": task, "state": state, "step": step, "trip_counts": trip_counts,
          "spec": spec}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--nets", default="ff,rnn")
  p.add_argument("--presets", default="paper,fast")
  p.add_argument("--solvers", default="", help="comma-separated subset (default: all)")
  p.add_argument("--warmup_steps", type=int, default=300)
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "speed_mnist.md")
  args = p.parse_args(argv)
  only = set(filter(None, args.solvers.split(",")))

  rows = {}
  for net in args.nets.split(","):
    runs = {}
    for preset in args.presets.split(","):
      for name in SOLVERS[net]:
        if only and name not in only:
          continue
        r = setup(net, preset, name)
        for i in range(args.warmup_steps):
          r["state"], m = r["step"](r["state"], r["task"].train_batch(i))
        jax.block_until_ready(m)
        runs[(preset, name)] = r
        print(f"{net} {preset} {name}: warmed up", flush=True)
    per_round = max(1, args.steps // args.rounds)
    times = {k: ([], []) for k in runs}
    trips = {k: [] for k in runs}
    load = []
    for rnd in range(args.rounds):
      load.append(os.getloadavg()[0])
      for key, r in runs.items():
        for j in range(per_round):
          batch = r["task"].train_batch(args.warmup_steps + rnd * per_round + j)
          t, c = time.perf_counter(), time.process_time()
          _, m = r["step"](r["state"], batch)
          jax.block_until_ready(m)
          times[key][0].append(time.perf_counter() - t)
          times[key][1].append(time.process_time() - c)
          counts = r["trip_counts"](r["state"].params, r["state"].solver_params, batch)
          trips[key].append(sum(float(v) for v in counts.values()))
    for key in runs:
      rows[(net,) + key] = {"wall": statistics.median(times[key][0]),
                            "cpu": statistics.median(times[key][1]),
                            "iters": float(np.mean(trips[key])), "n": len(times[key][0]),
                            "spec": runs[key]["spec"], "load": float(np.mean(load))}
      print(net, key, rows[(net,) + key], flush=True)

  text = report(rows, args, argv)
  atomic_write_text(args.results, text)
  print(text)
  return 0


def _ms(s):
  return "--" if s is None else (f"{1e3 * s:.1f} ms" if s < 1 else f"{s:.2f} s")


def report(rows: dict, args, argv) -> str:
  try:
    model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                 if l.startswith("model name"))
  except (OSError, StopIteration):
    model = platform.machine()
  lines = ["# Speed: one training step on MNIST (batch 64), per solver", "",
           "Median over the timed steps after compilation and warm-up; `iters` = "
           "fixed-point iterations per step (while-loop trip count = max over the "
           "batch, summed over phases; for LF including the noisy steps of the Q rule). Authors: their PyTorch code on this machine kind "
           "(2-core CPU). Speed-up = authors' time / our wall time.", "",
           "| net | solver | preset | wall / step | CPU / step | iters | authors | "
           "authors iters | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
  for (net, preset, name), r in sorted(rows.items(), key=lambda kv: (
      kv[0][0], SOLVERS[kv[0][0]].index(kv[0][2]), kv[0][1])):
    a_time, a_iters = AUTHORS.get((net, name), (None, None))
    speed = f"{a_time / r['wall']:.0f}x" if a_time else "--"
    lines.append(f"| {net} | {name} | {preset} | {_ms(r['wall'])} | {_ms(r['cpu'])} | "
                 f"{r['iters']:.0f} | {_ms(a_time)} | {a_iters or '--'} | {speed} |")
  lines += ["", "LCP-DI / RBP per-step cost ratio (RNN; authors: 1.08 s / 22 ms = 49x):", ""]
  for preset in args.presets.split(","):
    di, rbp = rows.get(("rnn", preset, "lcp_di")), rows.get(("rnn", preset, "rbp"))
    if di and rbp:
      lines.append(f"- preset `{preset}`: wall {di['wall'] / rbp['wall']:.2f}x, "
                   f"CPU {di['cpu'] / rbp['cpu']:.2f}x "
                   f"({_ms(di['wall'])} vs {_ms(rbp['wall'])})")
  loads = [r["load"] for r in rows.values()]
  lines += ["", "## How it ran", "",
            f"- command: `python -m benchmarks.speed_mnist {' '.join(argv or sys.argv[1:])}`",
            f"- {args.warmup_steps} warm-up training steps, then {rows and next(iter(rows.values()))['n']} "
            f"timed steps per row in {args.rounds} interleaved rounds",
            f"- machine: {os.cpu_count()}-core CPU ({model}), jax {jax.__version__} "
            f"({jax.default_backend()}, float32, 1 device); shared with other jobs, "
            f"1-min load average during timing {min(loads):.1f}-{max(loads):.1f}"
            if loads else "",
            f"- written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
