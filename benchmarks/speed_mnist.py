"""Per-step cost of every circuit on the MNIST equilibrium networks (batch 64, real MNIST).

    python -m benchmarks.speed_mnist                           # both nets, preset paper
    python -m benchmarks.speed_mnist --presets paper,authors,paper_normalized,fast
    python -m benchmarks.speed_mnist --nets rnn --solvers rbp,lcp_di --warmup_steps 2 \\
        --steps 2 --rounds 1 --floor_steps 20 --results runs/speed_smoke.md   # smoke test

For each (network, preset, solver): the config exactly as ``launch/run.py
--config mnist_<net>:<preset> --config.solver=<solver>`` builds it; train
``--warmup_steps`` steps (timing away from initialisation), then time the
jitted training step (after compilation) in interleaved rounds (every row gets
a few steps per round, so load changes on a shared machine hit all rows
alike). Reported per row: median wall / CPU time per step; ``iters`` = the
fixed-point iterations per step (while-loop trip counts: max over the batch,
summed over phases; for the Newton route one iteration is one evaluation of
the field or one Jacobian-vector product; for LF plus the noisy steps of the Q
rule); ms per iteration = wall / iters.

Floor: the same controlled iteration (one Euler step of the circuit's
controlled field, vmapped over the batch) as one fused XLA loop of
``--floor_steps`` steps, without our engine (no stopping test, no per-example
freezing, no ravel), measured in the same process at the row's parameters;
the ratio is ms per iteration / floor. ``--hlo`` also counts the operations
in that loop's body and in the while bodies of our solver call (compiled
HLO on this backend): a proxy for kernels per iteration.

The authors' column is the table of issue 13: their PyTorch code, measured on a
2-core AVX2 CPU (batch 64, median per step, torch 2 threads); it is not
re-measured here.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

import problems
from bilevel.train import data_mesh, init_train_state, make_train_step
from launch import config as cfglib
from launch import optim
from launch import schema
from launch.records import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
SOLVERS = {"ff": ("bp", "rbp", "lcp_di", "lcp_kp", "lcp_ebd", "lcp_lf"),
           "rnn": ("rbp", "lcp_di", "lcp_kp", "lcp_ebd", "lcp_lf")}
# Issue 13: the authors' code on a 2-core AVX2 CPU, seconds per step (iterations).
AUTHORS = {("ff", "lcp_di"): (0.446, 84), ("ff", "lcp_kp"): (0.296, 80),
           ("ff", "lcp_ebd"): (5.25, 800), ("ff", "lcp_lf"): (5.68, 902),
           ("rnn", "rbp"): (0.075, 89), ("rnn", "lcp_di"): (3.02, 713),
           ("rnn", "lcp_ebd"): (1.07, 296)}


def setup(net: str, preset: str, solver_name: str) -> dict:
  spec = f"mnist_{net}" + (f":{preset}" if preset else "")
  config = cfglib.load(spec, [("solver", solver_name),
                              ("problem_options.eval_train_examples", "0")])
  task = problems.make_task(config)
  solver = schema.build_solver(config)
  optimizer = optim.make_optimizer(schema.optimizer_config(config),
                                   config.num_epochs * task.steps_per_epoch,
                                   task.steps_per_epoch)
  state = init_train_state(task.problem, solver, optimizer, jax.random.key(0), task.example)
  step = make_train_step(task.problem, solver, optimizer, mesh=data_mesh(1))

  @jax.jit
  def trip_counts(params, solver_params, batch):
    stats = solver(task.problem, params, solver_params, batch, jax.random.key(0)).stats
    counts = {k: v.max() for k, v in stats.items() if k.endswith("/iterations")}
    if getattr(solver, "learn_q", False):  # lcp_lf: the noisy relaxation of the Q rule
      counts["q_learning/iterations"] = solver.noise_steps
    return counts

  return {"task": task, "solver": solver, "state": state, "step": step,
          "trip_counts": trip_counts, "spec": spec}


def fused_floor(run: dict, batch: dict, steps: int, hlo: bool) -> dict:
  """ms per Euler step of the circuit's controlled field in one fused XLA loop."""
  solver, problem = run["solver"], run["task"].problem
  if not hasattr(solver, "field"):
    return {}
  params, solver_params = run["state"].params, run["state"].solver_params
  free = jax.jit(lambda p, b: solver.free_equilibrium(problem, p, b))(params, batch)
  z0 = jax.vmap(lambda phi, ex: solver.initial_state(problem, phi, ex))(free.value, batch)

  def loop(p, sp, z, b):
    field = jax.vmap(lambda zz, ex: solver.field(problem, p, sp, ex)(zz))
    return jax.lax.fori_loop(0, steps, lambda i, zz: jax.tree.map(
        lambda a, d: a + 1.0 * d, zz, field(zz, b)), z)

  fn = jax.jit(loop)
  jax.block_until_ready(fn(params, solver_params, z0, batch))
  times = []
  for _ in range(3):
    t = time.perf_counter()
    jax.block_until_ready(fn(params, solver_params, z0, batch))
    times.append(time.perf_counter() - t)
  out = {"floor_ms": 1e3 * min(times) / steps}
  if hlo:
    text = fn.lower(params, solver_params, z0, batch).compile().as_text()
    out["floor_ops"] = max((c["ops"] for c in while_body_ops(text)), default=0)
  return out


def while_body_ops(hlo_text: str) -> list[dict]:
  """Instruction counts of every while-loop body in compiled HLO text."""
  bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo_text))
  out = []
  for block in re.split(r"\n(?=\S)", hlo_text):
    m = re.match(r"%?([\w.\-]+) ", block)
    if not m or m.group(1) not in bodies:
      continue
    lines = [l for l in block.splitlines()[1:] if " = " in l]
    count = lambda pat: sum(bool(re.search(pat, l)) for l in lines)
    out.append({"body": m.group(1), "ops": len(lines), "fusions": count(r"\bfusion\("),
                "dots": count(r"\bdot\(|custom-call\(")})
  return out


def time_rows(runs: dict, args) -> dict:
  """Interleaved rounds: per row, wall and CPU seconds per step and trip counts."""
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
  return {key: {"wall": statistics.median(times[key][0]),
                "cpu": statistics.median(times[key][1]),
                "iters": float(np.mean(trips[key])), "n": len(times[key][0]),
                "spec": runs[key]["spec"], "load": float(np.mean(load))} for key in runs}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--nets", default="ff,rnn")
  p.add_argument("--presets", default="paper",
                 help="comma-separated; '' or 'none' = the config without preset")
  p.add_argument("--solvers", default="", help="comma-separated subset (default: all)")
  p.add_argument("--warmup_steps", type=int, default=300)
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--floor_steps", type=int, default=200)
  p.add_argument("--hlo", action="store_true", help="count HLO ops per loop body")
  p.add_argument("--results", type=Path,
                 default=ROOT / "benchmarks" / "results" / "speed_mnist.md")
  args = p.parse_args(argv)
  only = set(filter(None, args.solvers.split(",")))
  presets = ["" if x == "none" else x for x in args.presets.split(",")]

  rows = {}
  for net in args.nets.split(","):
    runs = {}
    for preset in presets:
      for name in SOLVERS[net]:
        if only and name not in only:
          continue
        r = setup(net, preset, name)
        # At least 2: the step compiles again for its own output state.
        for i in range(max(args.warmup_steps, 2)):
          r["state"], m = r["step"](r["state"], r["task"].train_batch(i))
        jax.block_until_ready(r["state"].params)
        runs[(preset, name)] = r
        print(f"{net} {preset or 'none'} {name}: warmed up", flush=True)
    for key, row in time_rows(runs, args).items():
      r = runs[key]
      batch = r["task"].train_batch(args.warmup_steps)
      row.update(fused_floor(r, batch, args.floor_steps, args.hlo))
      if args.hlo:
        st = r["state"]  # the solver call of the step (its while loops), jitted alone
        text = r["trip_counts"].lower(st.params, st.solver_params, batch).compile().as_text()
        row["engine_ops"] = while_body_ops(text)
      rows[(net,) + key] = row
      print(net, key, {k: v for k, v in row.items() if k != "engine_ops"}, flush=True)

  text = report(rows, args, argv)
  atomic_write_text(args.results, text)
  print(text)
  return 0


def _ms(s):
  return "--" if s is None else (f"{1e3 * s:.1f} ms" if s < 1 else f"{s:.2f} s")


def _cpu_model() -> str:
  try:
    return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.machine()


def report(rows: dict, args, argv) -> str:
  lines = ["# Speed: one training step on MNIST (batch 64), per circuit", "",
           "Median wall / CPU time per step after compilation and warm-up; `iters` = "
           "fixed-point iterations per step (trip counts, max over the batch, summed over "
           "phases; Newton route: field evaluations + JVPs; LF: + the noisy Q-rule steps); "
           "ms/iter = wall / iters; floor = one Euler step of the same controlled field "
           "in one fused XLA loop, same process; ratio = ms/iter / floor (iters mix free "
           "steps, cheaper than a controlled one, so the ratio can fall below 1; LF's "
           "noisy Q-rule steps differ from its floor step). Authors: their "
           "PyTorch code on a 2-core AVX2 CPU, from issue 13 (not re-measured); "
           "speed-up = authors / ours.", "",
           "| net | circuit | preset | wall / step | CPU / step | iters | ms / iter | "
           "floor ms / iter | ratio | authors (iters) | speed-up |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for (net, preset, name), r in sorted(rows.items(), key=lambda kv: (
      kv[0][0], SOLVERS[kv[0][0]].index(kv[0][2]), kv[0][1])):
    a_time, a_iters = AUTHORS.get((net, name), (None, None))
    per_iter = r["wall"] / max(r["iters"], 1.0)
    floor = r.get("floor_ms")
    ratio = f"{1e3 * per_iter / floor:.2f}" if floor else "--"
    speed = f"{a_time / r['wall']:.1f}x" if a_time else "--"
    floor_text = f"{floor:.3f}" if floor else "--"
    lines.append(
        f"| {net} | {name} | {preset or 'none'} | {_ms(r['wall'])} | {_ms(r['cpu'])} | "
        f"{r['iters']:.0f} | {1e3 * per_iter:.3f} | {floor_text} | {ratio} | "
        f"{_ms(a_time)} ({a_iters or '--'}) | {speed} |")
  lines += ["", "RNN LCP-DI / RBP per step (authors: 3.02 s / 75 ms = 40x):", ""]
  for preset in {k[1] for k in rows}:
    di, rbp = rows.get(("rnn", preset, "lcp_di")), rows.get(("rnn", preset, "rbp"))
    if di and rbp:
      lines.append(f"- `{preset or 'none'}`: wall {di['wall'] / rbp['wall']:.2f}x, CPU "
                   f"{di['cpu'] / rbp['cpu']:.2f}x ({_ms(di['wall'])} vs {_ms(rbp['wall'])})")
  if args.hlo:
    lines += ["", "## HLO ops per loop body (compiled, this backend)", "",
              "Top-level instructions of each while body (free, then controlled / "
              "adjoint); on GPU each fusion is about one kernel launch.", ""]
    for (net, preset, name), r in sorted(rows.items()):
      bodies = ", ".join(f"{b['ops']} ops / {b['fusions']} fusions"
                         for b in r.get("engine_ops", []))
      lines.append(f"- {net} {name} `{preset or 'none'}`: fused floor body "
                   f"{r.get('floor_ops', '--')} ops; solver while bodies: {bodies}")
  loads = [r["load"] for r in rows.values()] or [0.0]
  lines += ["", "## How it ran", "",
            f"- command: `python -m benchmarks.speed_mnist {' '.join(argv or sys.argv[1:])}`",
            f"- {args.warmup_steps} warm-up steps, then "
            f"{next(iter(rows.values()))['n'] if rows else 0} timed steps per row in "
            f"{args.rounds} interleaved rounds; floor loop {args.floor_steps} steps",
            f"- machine: {os.cpu_count()}-core CPU ({_cpu_model()}), jax {jax.__version__} "
            f"({jax.default_backend()}, float32, 1 device); 1-min load average during "
            f"timing {min(loads):.1f}-{max(loads):.1f}",
            f"- written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
