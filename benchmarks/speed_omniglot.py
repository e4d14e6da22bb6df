#!/usr/bin/env python
"""Speed and memory of the Omniglot complex-synapse solvers -> benchmarks/results/speed_omniglot.md.

    python -m benchmarks.speed_omniglot                 # all three parts, CPU-sized
    python -m benchmarks.speed_omniglot --parts inner   # just the inner-step table
    python -m benchmarks.speed_omniglot --scale paper --out $OUT/speed_omniglot.md  # accelerator

Three parts:

* ``inner`` -- ms per inner SGD step per task of the free relaxation (conv-4,
  64 channels, one 20-way 1-shot support set of 20 images 28x28), the inner
  loop compiled as the engine runs it (a ``lax.while_loop``), for both
  convolution implementations (``conv_impl``: im2col ``matmul`` / ``lax``),
  1 or 4 vmapped tasks with per-task weights, and ``steps_per_check`` 1 / 5; plus
  the straight-line (Python-unrolled, no loop) reference.
* ``meta`` -- seconds per meta-step and tasks per second of every solver's jitted
  train step (``bilevel.train.make_train_step``, one device) at the chosen scale.
* ``memory`` -- peak memory of every solver's compiled train step as the number
  of inner steps grows (XLA's buffer assignment for the whole step:
  arguments + outputs + temporaries, from ``compiled.memory_analysis()``;
  deterministic, unlike process RSS). Implicit / equilibrium solvers must stay
  flat; ``bp`` (MAML, backprop through the unrolled loop) grows linearly.

Timings are wall-clock minima over repeats; on a shared machine they are upper
bounds. The file records the command, the machine and its load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent

import jax
import jax.numpy as jnp
import optax

import problems
import solvers
from benchmarks import common
from launch import config as cfglib
from bilevel.relaxation import relaxation_from_config
from bilevel.train import data_mesh, init_train_state, make_train_step, replicate_on
from configs import omniglot as omniglot_config
from launch.records import atomic_write_text

ALL_SOLVERS = ("lcp", "cml", "imaml", "rbp", "t1t2", "fomaml", "reptile", "bp")


def _time(fn, *args, reps: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def _config(scale: str, **problem_options):
  c = omniglot_config.get_config(None if scale == "paper" else "quick")
  c.problem_options.update(problem_options)
  return c


# ----- inner step --------------------------------------------------------------------

def inner_table(steps: int, reps: int) -> list[str]:
  rows = ["| conv_impl | loop | tasks vmapped | steps_per_check | ms / inner step / task |",
          "|---|---|---:|---:|---:|"]
  base = _config("paper", channels=64, n_query=1, eval_tasks=1, official_runs=False)
  for impl in ("matmul", "lax"):
    task = problems.make_task(_config("paper", channels=64, n_query=1, eval_tasks=1,
                                      official_runs=False, conv_impl=impl))
    problem = task.problem
    params = problem.init_params(jax.random.key(0), task.example)
    free_cfg = cfglib.to_dict(base.solvers.lcp.free)
    for n_tasks, spc, loop in ((1, 1, "while"), (1, 5, "while"), (4, 1, "while"),
                               (4, 5, "while"), (1, 0, "none (unrolled)")):
      if impl == "lax" and n_tasks == 4 and spc == 5:
        continue
      batch = jax.tree.map(jnp.asarray, task.train_batch(0))
      batch = jax.tree.map(lambda a: a[:n_tasks], batch)
      relax = relaxation_from_config({**free_cfg, "rtol": 0.0, "max_steps": steps,
                                      "steps_per_check": max(spc, 1)})
      if spc == 0:  # straight-line reference: K steps unrolled in Python, no loop
        def run(p, b, relax=relax):
          def one(ex):
            field = lambda s: problem.f(p, s, ex)
            z = problem.init_state(p, ex)
            fz, st = field(z), relax.strategy.init(z, field(z))
            for _ in range(steps):
              z, st = relax.strategy.step(z, fz, st)
              fz = field(z)
            return z
          return jax.vmap(one)(b)
      else:
        def run(p, b, relax=relax):
          return jax.vmap(lambda ex: relax.solve(lambda s: problem.f(p, s, ex),
                                                 problem.init_state(p, ex)).value)(b)
      sec = _time(jax.jit(run), params, batch, reps=reps)
      ms = 1000 * sec / steps / n_tasks
      rows.append(f"| {impl} | {loop} | {n_tasks} | {spc or '-'} | {ms:.1f} |")
      print(rows[-1], flush=True)
  return rows


# ----- meta-step -----------------------------------------------------------------------

def _train_step(config, name):
  task = problems.make_task(config)
  solver = solvers.get_solver(name, **cfglib.to_dict(config.solvers[name]))
  opt = optax.adam(1e-3)
  mesh = data_mesh(1)
  state = replicate_on(mesh, init_train_state(task.problem, solver, opt, jax.random.key(0),
                                              task.example))
  step = make_train_step(task.problem, solver, opt, mesh=mesh)
  return task, state, step


def meta_table(scale: str, names, reps: int) -> list[str]:
  config = _config(scale, eval_tasks=1, official_runs=False)
  o = config.problem_options
  rows = [f"Scale `{scale}`: {o.n_way}-way {o.k_shot}-shot, {o.n_query} query/class, "
          f"{o.channels} channels, meta-batch {config.batch_size}, "
          f"{config.solvers.lcp.free.max_steps} inner steps.", "",
          "| solver | s / meta-step | tasks / s |", "|---|---:|---:|"]
  for name in names:
    task, state, step = _train_step(config, name)
    batch = task.train_batch(0)
    step(state, batch)  # compile
    best = float("inf")
    for i in range(reps):
      t = time.perf_counter()
      _, metrics = step(state, task.train_batch(i + 1))
      jax.block_until_ready(metrics)
      best = min(best, time.perf_counter() - t)
    rows.append(f"| {name} | {best:.2f} | {config.batch_size / best:.2f} |")
    print(rows[-1], flush=True)
  return rows


# ----- memory ---------------------------------------------------------------------------

def _peak_bytes(config, name) -> float:
  task, state, step = _train_step(config, name)
  batch = jax.tree.map(jnp.asarray, task.train_batch(0))
  stats = _jitted_of(step).lower(state, batch).compile().memory_analysis()
  return (stats.temp_size_in_bytes + stats.argument_size_in_bytes
          + stats.output_size_in_bytes - stats.alias_size_in_bytes)


def _jitted_of(step):
  """The jitted function inside ``make_train_step``'s batch-size-checking wrapper."""
  for cell in step.__closure__ or ():
    if hasattr(cell.cell_contents, "lower"):
      return cell.cell_contents
  raise RuntimeError("could not find the jitted train step")


def memory_table(scale: str, names, inner_steps) -> list[str]:
  rows = ["| solver | " + " | ".join(f"{k} inner steps" for k in inner_steps) + " |",
          "|---|" + "---:|" * len(inner_steps)]
  for name in names:
    cells = []
    for k in inner_steps:
      config = _config(scale, eval_tasks=1, official_runs=False)
      scale_steps(config, k)
      cells.append(f"{_peak_bytes(config, name) / 2**20:.1f} MiB")
    rows.append(f"| {name} | " + " | ".join(cells) + " |")
    print(rows[-1], flush=True)
  return rows


def scale_steps(config, k: int) -> None:
  """Sets every phase's budget from the number of inner steps k (phases k/2)."""
  for name in config.solvers:
    s = config.solvers[name]
    s.free.max_steps = k
    for phase in ("nudged", "controlled", "adjoint"):
      if phase in s and "strategy" in s[phase]:
        s[phase].max_steps = k // 2 if phase == "nudged" else k
    if "num_steps" in s:
      s.num_steps = k


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--parts", default="inner,meta,memory")
  p.add_argument("--scale", default="quick", choices=("quick", "paper"))
  p.add_argument("--solvers", default=",".join(ALL_SOLVERS))
  p.add_argument("--inner_steps", default="25,50,100")
  p.add_argument("--steps", type=int, default=20, help="inner steps timed in `inner`")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--out", default=str(_ROOT / "benchmarks/results/speed_omniglot.md"))
  args = p.parse_args(argv)
  parts = args.parts.split(",")
  names = args.solvers.split(",")
  out = ["# Omniglot complex-synapse solvers: speed and memory", "",
         f"Command: `python -m benchmarks.speed_omniglot {' '.join(argv or sys.argv[1:])}`",
         "", f"Machine: {common.machine_with_load()}", ""]
  if "inner" in parts:
    out += ["## Inner step (free relaxation, conv-4 64 channels, 20 support images 28x28)", ""]
    out += inner_table(args.steps, args.reps) + [""]
  if "meta" in parts:
    out += ["## Meta-step per solver", ""] + meta_table(args.scale, names, args.reps) + [""]
  if "memory" in parts:
    ks = [int(k) for k in args.inner_steps.split(",")]
    out += [f"## Peak memory of the compiled train step vs inner steps (scale "
            f"`{args.scale}`; nudged phases k/2, controlled / adjoint k)", ""]
    out += memory_table(args.scale, names, ks) + [""]
  out += [f"Finished with load average {os.getloadavg()[0]:.1f}.", ""]
  atomic_write_text(args.out, "\n".join(out) + "\n")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
