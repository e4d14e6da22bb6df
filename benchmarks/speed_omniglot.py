#!/usr/bin/env python
"""Speed and memory of the Omniglot complex-synapse solvers -> benchmarks/results/speed_omniglot.md.

    python -m benchmarks.speed_omniglot                 # inner, meta, memory; CPU-sized
    python -m benchmarks.speed_omniglot --parts inner   # just the inner-step table
    python -m benchmarks.speed_omniglot --parts meta --scale paper --solvers lcp \
        --out $OUT/meta_lcp.md                          # accelerator (benchmarks/omniglot_gpu.sh)
    python -m benchmarks.speed_omniglot --parts profile --batch_size 1 \
        --out benchmarks/results/omniglot_profile.md    # where a paper-scale meta-step's time goes

Parts:

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

* ``profile`` -- where the time of a paper-scale meta-step goes: ms per inner step
  per task for the two kinds of inner step (support only: the free phase; support +
  query: CML's nudged and LCP's controlled phases), by convolution implementation,
  loop form (``lax.while_loop`` with ``steps_per_check`` 1 / 5, or straight-line),
  with and without batch norm; then one paper-scale meta-step (``--batch_size``
  tasks) split into its free phase and the rest, per solver.

``meta`` and ``profile`` report medians (and the compile time separately);
the other parts wall-clock minima over repeats; on a shared machine they are upper
bounds. The file records the command, the machine and its load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
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
from bilevel.relaxation import relaxation_from_config
from bilevel.train import data_mesh, init_train_state, make_train_step, replicate_on
from configs import omniglot as omniglot_config
from launch import schema
from launch.records import atomic_write_text
from problems import convnet

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


def _override(config, conv_impl=None, steps_per_check=None, batch_size=None):
  """Command-line overrides of the convolution, the while-loop chunking and the meta-batch."""
  if conv_impl:
    config.problem_options.conv_impl = conv_impl
  if batch_size:
    config.batch_size = int(batch_size)
  if steps_per_check:
    for name in config.solvers:
      for phase in config.solvers[name].values():
        if isinstance(phase, dict) or hasattr(phase, "keys"):
          if "steps_per_check" in phase:
            phase["steps_per_check"] = int(steps_per_check)
  return config


def _median_time(fn, *args, reps: int = 3) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of ``reps`` further calls)."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


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
    free_cfg = schema.to_dict(base.solvers.lcp.free)
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
  solver = solvers.get_solver(name, **schema.to_dict(config.solvers[name]))
  opt = optax.adam(1e-3)
  mesh = data_mesh(1)
  state = replicate_on(mesh, init_train_state(task.problem, solver, opt, jax.random.key(0),
                                              task.example))
  step = make_train_step(task.problem, solver, opt, mesh=mesh)
  return task, state, step


def meta_table(config, scale: str, names, reps: int) -> list[str]:
  o = config.problem_options
  rows = [f"Scale `{scale}`: {o.n_way}-way {o.k_shot}-shot, {o.n_query} query/class, "
          f"{o.channels} channels, conv_impl `{o.conv_impl}`, meta-batch {config.batch_size}, "
          f"{config.solvers.lcp.free.max_steps} free steps, steps_per_check "
          f"{config.solvers.lcp.free.steps_per_check}. Median of {reps} meta-steps after "
          "the first (compile + first step reported separately).", "",
          "| solver | s / meta-step (median) | tasks / s | compile + first step s |",
          "|---|---:|---:|---:|"]
  for name in names:
    task, state, step = _train_step(config, name)
    t = time.perf_counter()
    jax.block_until_ready(step(state, task.train_batch(0)))
    first = time.perf_counter() - t
    times = []
    for i in range(reps):
      batch = task.train_batch(i + 1)
      t = time.perf_counter()
      _, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    med = statistics.median(times)
    rows.append(f"| {name} | {med:.3f} | {config.batch_size / med:.2f} | {first:.1f} |")
    print(rows[-1], flush=True)
  return rows


# ----- profile --------------------------------------------------------------------------

def _inner_loop(problem, params, relax, query: bool, loop: str, steps: int):
  """jitted fn(batch) -> phi after ``steps`` inner steps per task (vmapped over tasks).

  ``query=False``: the free field -grad E (support set only). ``query=True``: the free
  field minus grad L_eval (query set) -- the per-step work of CML's nudged and LCP's
  controlled phases. ``loop``: "while" (the engine's lax.while_loop, rtol 0 so it runs
  exactly ``steps``) or "unrolled" (straight-line Python loop, no while).
  """
  def one(ex):
    def field(phi):
      f = problem.f(params, phi, ex)
      if not query:
        return f
      g = jax.grad(problem.outer_loss)(phi, ex)
      return jax.tree.map(lambda a, b: a - b, f, g)
    z = problem.init_state(params, ex)
    if loop == "while":
      return relax.solve(field, z).value
    fz = field(z)
    st = relax.strategy.init(z, fz)
    for _ in range(steps):
      z, st = relax.strategy.step(z, fz, st)
      fz = field(z)
    return z
  return jax.jit(jax.vmap(one))


def step_cost_table(steps: int, query_steps: int, reps: int, n_tasks: int) -> list[str]:
  """ms per inner step per task by convolution, data, loop form, chunking and batch norm."""
  rows = ["| conv_impl | images per step (data) | loop | steps_per_check | batch norm | "
          "tasks | ms / step / task (median) | GFLOP / step / task (XLA) | compile + first s |",
          "|---|---|---|---:|---|---:|---:|---:|---:|"]
  grid = [("matmul", False, "while", 1, True, 1), ("matmul", False, "while", 5, True, 1),
          ("matmul", False, "unrolled", 0, True, 1), ("matmul", False, "while", 1, False, 1),
          ("matmul", False, "while", 1, True, n_tasks),
          ("matmul", True, "while", 1, True, 1), ("matmul", True, "while", 5, True, 1),
          ("matmul", True, "unrolled", 0, True, 1),
          ("lax", False, "while", 1, True, 1), ("lax", False, "while", 5, True, 1),
          ("lax", False, "unrolled", 0, True, 1),
          ("lax", True, "unrolled", 0, True, 1)]
  # (lax, support + query, while) is left out: ~30 s per step on the 2-core CPU.
  original_bn = convnet.batch_norm
  for impl, query, loop, spc, bn, tasks in grid:
    config = _config("paper", eval_tasks=1, official_runs=False, conv_impl=impl)
    task = problems.make_task(config)
    problem = task.problem
    params = problem.init_params(jax.random.key(0), task.example)
    k = query_steps if query else steps
    relax = relaxation_from_config({**schema.to_dict(config.solvers.lcp.free), "rtol": 0.0,
                                    "max_steps": k, "steps_per_check": max(spc, 1)})
    batch = jax.tree.map(lambda a: jnp.asarray(a[:tasks]), task.train_batch(0))
    if not bn:  # affine only: what batch norm's statistics cost
      convnet.batch_norm = lambda x, scale, offset, eps=1e-5: x * scale + offset
    try:
      fn = _inner_loop(problem, params, relax, query, loop, k)
      first, sec = _median_time(fn, batch, reps=reps)
      # XLA's flop count of the compiled loop (only meaningful without a while loop,
      # whose trip count the cost analysis does not know).
      flops = fn.lower(batch).compile().cost_analysis().get("flops", float("nan"))
    finally:
      convnet.batch_norm = original_bn
    o = config.problem_options
    data = (f"{o.n_way * (o.k_shot + o.n_query)} (support + query)" if query
            else f"{o.n_way * o.k_shot} (support)")
    rows.append(f"| {impl} | {data} | {loop} | {spc or '-'} | {'yes' if bn else 'no'} | "
                f"{tasks} | {1000 * sec / k / tasks:.1f} | "
                f"{flops / k / tasks / 1e9 if loop == 'unrolled' else float('nan'):.2f} | "
                f"{first:.1f} |")
    print(rows[-1], flush=True)
  return rows


_PHASES = {"lcp": ("controlled", 1), "cml": ("nudged", 2), "rbp": ("adjoint", 1)}


def _phase_budget(config, name: str) -> int:
  """Steps of the solver's second phase(s) (CML: two symmetric nudged phases)."""
  if name not in _PHASES:
    return 0
  phase, count = _PHASES[name]
  return count * int(config.solvers[name][phase].max_steps)


def breakdown_table(config, names, reps: int, phase_steps: int = 0) -> list[str]:
  """One paper-scale meta-step per solver: total, its free phase alone, and the rest.

  ``phase_steps`` > 0 shortens the second phase(s) (controlled / nudged / adjoint) to
  that many steps each, and extrapolates the rest linearly to the paper budget.
  """
  paper = {name: _phase_budget(config, name) for name in names}
  if phase_steps:
    for name, (phase, _) in _PHASES.items():
      config.solvers[name][phase].max_steps = phase_steps
  o = config.problem_options
  rows = [f"Paper budgets (second phases shortened to {phase_steps or 'paper'} steps and "
          f"extrapolated), meta-batch {config.batch_size}, conv_impl `{o.conv_impl}`, "
          f"steps_per_check {config.solvers.lcp.free.steps_per_check}; medians of {reps}.", "",
          "| solver | meta-step s | free phase s (iterations) | rest s (2nd-phase steps) | "
          "meta-step at paper budget s (extrapolated) | compile + first step s |",
          "|---|---:|---:|---:|---:|---:|"]
  for name in names:
    task, state, step = _train_step(config, name)
    solver = solvers.get_solver(name, **schema.to_dict(config.solvers[name]))
    batch = jax.tree.map(jnp.asarray, task.train_batch(1))
    free = jax.jit(lambda p, b: solver.free_equilibrium(task.problem, p, b))
    params = task.problem.init_params(jax.random.key(0), task.example)
    _, t_free = _median_time(free, params, batch, reps=reps)
    iters = float(jnp.mean(free(params, batch).iterations))
    first, t_step = _median_time(lambda b: step(state, b)[1], batch, reps=reps)
    done = _phase_budget(config, name)
    rest = t_step - t_free
    full = t_free + (rest * paper[name] / done if done else rest)
    rows.append(f"| {name} | {t_step:.2f} | {t_free:.2f} ({iters:.0f}) | "
                f"{rest:.2f} ({done}) | {full:.1f} | {first:.1f} |")
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
  p.add_argument("--conv_impl", default="", help="override problem_options.conv_impl")
  p.add_argument("--steps_per_check", type=int, default=0, help="override every phase's")
  p.add_argument("--batch_size", type=int, default=0, help="override the meta-batch")
  p.add_argument("--query_steps", type=int, default=4,
                 help="inner steps timed with the query set in `profile`")
  p.add_argument("--phase_steps", type=int, default=0,
                 help="`profile`: shorten 2nd phases to this many steps and extrapolate")
  p.add_argument("--out", default=str(_ROOT / "benchmarks/results/speed_omniglot.md"))
  args = p.parse_args(argv)
  parts = args.parts.split(",")
  names = args.solvers.split(",")
  overrides = dict(conv_impl=args.conv_impl, steps_per_check=args.steps_per_check,
                   batch_size=args.batch_size)
  out = ["# Omniglot complex-synapse solvers: " + ", ".join(parts), "",
         f"Command: `python -m benchmarks.speed_omniglot {' '.join(argv or sys.argv[1:])}`",
         "", f"Machine: {common.machine_with_load()}", ""]
  if "inner" in parts:
    out += ["## Inner step (free relaxation, conv-4 64 channels, 20 support images 28x28)", ""]
    out += inner_table(args.steps, args.reps) + [""]
  if "meta" in parts:
    config = _override(_config(args.scale, eval_tasks=1, official_runs=False), **overrides)
    out += ["## Meta-step per solver", ""] + meta_table(config, args.scale, names, args.reps)
    out += [""]
  if "profile" in parts:
    out += ["## Inner step cost (paper scale: 20-way 1-shot, 15 query/class, 64 channels)", ""]
    out += step_cost_table(args.steps, args.query_steps, args.reps,
                           max(args.batch_size, 2)) + [""]
    config = _override(_config("paper", eval_tasks=1, official_runs=False), **overrides)
    out += ["## One paper-scale meta-step, split", ""]
    out += breakdown_table(config, names, max(1, args.reps - 1), args.phase_steps) + [""]
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
