"""Routes to the controlled steady state on MNIST: iterations, convergence, gradient error.

    python -m benchmarks.routes_mnist --net rnn --solver lcp_di \\
        --variants paper_normalized paper authors 'paper@controlled_solve.method=newton'
    python -m benchmarks.routes_mnist --net ff --train_steps 5 --batches 1 \\
        --variants paper            # smoke test

Trains ``--train_steps`` steps of LCP-DI on raw [0, 1] inputs (the ``paper``
preset, seed 0) so the weights are past initialisation, then for each variant
``PRESET[@key=value;key=value]`` (keys under ``solvers.<solver>``) runs one
solver call per batch and reports: trip counts (max over the batch) of the
free and controlled phases, the controlled steps of the median example, the
converged fraction, the relative error of the update against a float64
reference (both phases to 1e-11, Newton-Krylov with the relaxation finishing)
and the wall time of one call. The table in benchmarks/results/speed_mnist.md
("Phase 1") was made with this procedure.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import problems
import solvers
from bilevel.train import data_mesh, init_train_state, make_train_step
from launch import config as cfglib
from launch import optim
from launch import schema

TIGHT = dict(rtol=1e-11, atol=0.0, max_steps=20000, steps_per_check=1)


def _cast(tree, dtype):
  return jax.tree.map(lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(
      jnp.asarray(a).dtype, jnp.floating) else a, tree)


def trained_params(net: str, steps: int):
  config = cfglib.load(f"mnist_{net}:paper", [("solver", "lcp_di"),
                                               ("problem_options.eval_train_examples", "0")])
  task = problems.make_task(config)
  solver = schema.build_solver(config)
  opt = optim.make_optimizer(schema.optimizer_config(config),
                             config.num_epochs * task.steps_per_epoch, task.steps_per_epoch)
  state = init_train_state(task.problem, solver, opt, jax.random.key(0), task.example)
  step = make_train_step(task.problem, solver, opt, mesh=data_mesh(1))
  for i in range(steps):
    state, _ = step(state, task.train_batch(i))
  return task, jax.device_get(state.params)


def variant_solver(net: str, solver: str, spec: str):
  preset, _, overrides = spec.partition("@")
  extra = [(f"solvers.{solver}.{k}", v) for k, v in
           (kv.split("=", 1) for kv in overrides.split(";") if kv)]
  config = cfglib.load(f"mnist_{net}:{preset}", [("solver", solver)] + extra)
  return schema.build_solver(config)


def reference_solver(net: str, solver: str):
  """Both phases to 1e-11; Newton-Krylov, the relaxation finishing what it leaves."""
  opts = schema.to_dict(cfglib.load(f"mnist_{net}:paper").solvers[solver])
  euler = {"strategy": "euler", "strategy_options": {"dt": 0.5}}
  opts.update(free=dict(TIGHT, **euler), controlled=dict(TIGHT, **euler),
              controlled_solve=dict(method="newton", krylov_dim=60, forcing=1e-8,
                                    max_work=400, fallback=True))
  return solvers.get_solver(solver, **opts)


def measure(solver, problem, params, batch, dtype) -> tuple:
  sp = solver.init(problem, params, jax.random.key(0))
  fn = jax.jit(lambda p, s, b: solver(problem, p, s, b, jax.random.key(0)))
  args = (_cast(params, dtype), _cast(sp, dtype), _cast(batch, dtype))
  jax.block_until_ready(fn(*args).grads)
  t = time.perf_counter()
  est = fn(*args)
  jax.block_until_ready(est.grads)
  return est, time.perf_counter() - t


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--net", default="rnn")
  p.add_argument("--solver", default="lcp_di")
  p.add_argument("--train_steps", type=int, default=300)
  p.add_argument("--batches", type=int, default=3)
  p.add_argument("--variants", nargs="+",
                 default=["paper_normalized", "paper", "authors",
                          "paper@controlled_solve.method=newton"])
  args = p.parse_args(argv)
  jax.config.update("jax_enable_x64", True)  # for the reference only; runs cast to f32
  task, params = trained_params(args.net, args.train_steps)
  ref_solver = reference_solver(args.net, args.solver)
  rows = {v: [] for v in args.variants}
  for b in range(args.batches):
    batch = task.train_batch(2000 + b)
    ref, _ = measure(ref_solver, task.problem, params, batch, jnp.float64)
    g0 = np.asarray(ravel_pytree(ref.grads)[0])
    for v in args.variants:
      est, t = measure(variant_solver(args.net, args.solver, v), task.problem, params, batch,
                       jnp.float32)
      st, g = est.stats, np.asarray(ravel_pytree(est.grads)[0])
      rows[v].append([int(st["free/iterations"].max()), int(st["controlled/iterations"].max()),
                      float(np.median(st["controlled/iterations"])),
                      float(np.mean(st["controlled/converged"])),
                      float(np.linalg.norm(g - g0) / np.linalg.norm(g0)), t])
  print(f"| {args.net} {args.solver} variant | trip | median | conv | grad err | call |")
  print("|---|---|---|---|---|---|")
  for v, r in rows.items():
    free, ctl, med, conv, err, t = np.mean(np.array(r), axis=0)
    print(f"| {v} | {free:.0f} + {ctl:.0f} | {med:.0f} | {conv:.3f} | {err:.1e} | "
          f"{1e3 * t:.0f} ms |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
