"""Slow examples in a vmapped batch: quorum and compaction on mnist_rnn:paper.

    python -m benchmarks.stragglers_mnist --warm_steps 100                 # all variants
    python -m benchmarks.stragglers_mnist --warm_steps 100 --variants rbp lcp_di \
        "lcp_di@free.compaction=5;controlled.compaction=5"

Trains ``--warm_steps`` LCP-DI steps (``mnist_rnn:paper``, seed 0), then for each
variant ``SOLVER[@key=value;key=value]`` (keys under ``solvers.<SOLVER>``; the
``paper`` preset's own compaction is switched off first, so each variant says
what it adds) calls
the solver on ``--batches`` training batches of 64 at those weights and prints:
iterations per step (while-loop trip counts, max over the batch, summed over
phases), field evaluations per example (mean over the batch, summed over phases),
the fraction of examples a quorum drops, the update's cosine with plain LCP-DI's
update on the same batch, and the median wall time of one call (interleaved
rounds; only meaningful on a quiet machine). docs/design.md quotes its numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

import problems
from bilevel.train import data_mesh, init_train_state, make_train_step
from launch import config as cfglib
from launch import optim
from launch import schema

COMPACT = "free.compaction=5;controlled.compaction=5"
DEFAULT_VARIANTS = ("lcp_di", "lcp_di@controlled.quorum=0.98", "lcp_di@controlled.quorum=0.95",
                    f"lcp_di@{COMPACT}", f"lcp_di@controlled_solve=reduced;{COMPACT}", "rbp",
                    "rbp@free.compaction=5;adjoint.compaction=5")
REFERENCE = "lcp_di"


def build(spec: str):
  solver, _, overrides = spec.partition("@")
  pairs = [(f"solvers.{solver}.{k}", v) for k, v in
           (kv.split("=", 1) for kv in overrides.split(";") if kv)]
  base = cfglib.load("mnist_rnn:paper").solvers[solver]
  plain = [(f"solvers.{solver}.{phase}.compaction", "0")
           for phase in ("free", "controlled", "adjoint") if phase in base]
  config = cfglib.load("mnist_rnn:paper", [("solver", solver),
                                           ("problem_options.eval_train_examples", "0")]
                       + plain + pairs)
  return config, schema.build_solver(config)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--warm_steps", type=int, default=100)
  p.add_argument("--batches", type=int, default=12)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
  args = p.parse_args(argv)
  config, lcp = build(REFERENCE)
  task = problems.make_task(config)
  opt = optim.make_optimizer(schema.optimizer_config(config),
                             config.num_epochs * task.steps_per_epoch, task.steps_per_epoch)
  state = init_train_state(task.problem, lcp, opt, jax.random.key(0), task.example)
  step = make_train_step(task.problem, lcp, opt, mesh=data_mesh(1))
  for i in range(args.warm_steps):
    state, _ = step(state, task.train_batch(i))
  params, solver_params = state.params, state.solver_params
  batches = [task.train_batch(args.warm_steps + j) for j in range(args.batches)]
  calls = {}
  for spec in dict.fromkeys([REFERENCE] + args.variants):
    solver = build(spec)[1]
    calls[spec] = jax.jit(lambda p_, s_, b, solver=solver: solver(
        task.problem, p_, s_, b, jax.random.key(0)))
  stats = {spec: {"iters": [], "evals": [], "dropped": [], "cos": [], "time": []}
           for spec in calls}
  reference = {}
  for r in range(args.rounds):
    for j, batch in enumerate(batches):
      for spec, call in calls.items():
        if r == 0:
          jax.block_until_ready(call(params, solver_params, batch).grads)  # compile, warm
        t = time.perf_counter()
        est = call(params, solver_params, batch)
        jax.block_until_ready(est.grads)
        stats[spec]["time"].append(time.perf_counter() - t)
        if r:
          continue
        its = [v for k, v in est.stats.items() if k.endswith("/iterations")]
        stats[spec]["iters"].append(sum(float(np.max(v)) for v in its))
        stats[spec]["evals"].append(sum(float(np.mean(v)) for v in its))
        stats[spec]["dropped"].append(float(1 - np.mean(est.valid)))
        g = np.asarray(ravel_pytree(est.grads)[0])
        if spec == REFERENCE:
          reference[j] = g
        stats[spec]["cos"].append(float(g @ reference[j] / np.linalg.norm(g)
                                        / np.linalg.norm(reference[j])))
  print(f"mnist_rnn:paper after {args.warm_steps} LCP-DI steps, {args.batches} batches of "
        f"64, {args.rounds} rounds; load average {os.getloadavg()[0]:.1f}")
  print("| variant | iterations / step | evaluations / example | dropped | cos with "
        "lcp_di | median call |")
  print("|---|---:|---:|---:|---:|---:|")
  for spec, s in stats.items():
    print(f"| `{spec}` | {np.mean(s['iters']):.0f} | {np.mean(s['evals']):.0f} | "
          f"{100 * np.mean(s['dropped']):.1f}% | {np.mean(s['cos']):.5f} | "
          f"{1e3 * np.median(s['time']):.0f} ms |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
