"""Every meta-solver's update against the exact meta-gradients, on real Omniglot tasks.

``python -m benchmarks.meta_gradient_alignment [--channels 8] [--n-query 5] [--tasks 2]``
writes ``benchmarks/results/meta_gradient_alignment.md``.

For each net (smooth, max-pool) and task family (5-way and 20-way 1-shot), on
``--tasks`` real meta-training tasks at the initial omega, in float64:

* (a) the exact implicit meta-gradient (eq. 5 for eq. 16): phi* from the free
  phase run ``--tight-steps`` steps, then ``g = lambda (hess E)^{-1} grad L_eval``
  with the dense Hessian of E (the nets are small enough);
* (b) the exact gradient of the truncated inner procedure: ``jax.grad`` through
  the configured inner loop (the ``bp`` solver with the free budget);
* every solver's update (lcp at several alpha, cml at two beta, imaml, rbp, bp,
  fomaml, t1t2, reptile) with the options of ``configs/omniglot.py`` (quick
  preset, plus ``+smooth`` for the smooth net); cosine and norm ratio vs (a), (b).
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

jax.config.update("jax_enable_x64", True)

import problems  # noqa: E402
import solvers  # noqa: E402
from bilevel import fixed_point as fp  # noqa: E402
from configs import omniglot as omniglot_config  # noqa: E402
from launch import schema  # noqa: E402
from launch.records import atomic_write_text  # noqa: E402

OUT = "benchmarks/results/meta_gradient_alignment.md"
LCP_ALPHAS = (10.0, 1.0, 0.1, 0.01)
CML_BETAS = (0.03, 0.003)
OTHERS = ("imaml", "rbp", "bp", "fomaml", "t1t2", "reptile")


def _f64(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64)
                      if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)


def _setup(net: str, n_way: int, args) -> tuple[Any, Any, Any, Any]:
  preset = "quick+smooth" if net == "smooth" else "quick"
  c = omniglot_config.get_config(preset)
  c.problem_options.update(dict(n_way=n_way, channels=args.channels, n_query=args.n_query,
                                blocks=4))
  c.batch_size = args.tasks
  task = problems.make_task(c)
  batch = _f64(task.train_batch(0))
  params = _f64(task.problem.init_params(jax.random.key(0), task.example))
  return c, task.problem, params, batch


def _solver_specs(c) -> dict[str, Any]:
  """name -> solver, all from the preset's options (one place to read them)."""
  opts = {k: schema.to_dict(c.solvers[k]) for k in c.solvers}
  spc1 = lambda d: dict(d, steps_per_check=1)  # small compiles; same steps
  free = spc1(opts["lcp"]["free"])
  out = {}
  for a in LCP_ALPHAS:
    lcp = dict(opts["lcp"], free=free, alpha=a, k_i=1.0 / a,
               controlled=spc1(opts["lcp"]["controlled"]))
    out[f"lcp a={a:g}"] = solvers.get_solver("lcp", **lcp)
  for b in CML_BETAS:
    out[f"cml b={b:g}"] = solvers.get_solver("cml", **dict(opts["cml"], free=free, beta=b,
                                                          nudged=spc1(opts["cml"]["nudged"])))
  for name in OTHERS:
    o = dict(opts[name], free=free)
    if "adjoint" in o and "steps_per_check" in o["adjoint"]:
      o["adjoint"] = spc1(o["adjoint"])
    out[name] = solvers.get_solver(name, **o)
  return out


def _exact_implicit(problem, params, batch, steps: int) -> tuple[np.ndarray, float]:
  """(a): lambda (hess E(phi*))^{-1} grad L_eval(phi*), batch mean; phi* tight."""
  lam = 0.5
  grads, resid = [], []
  for i in range(jax.tree.leaves(batch)[0].shape[0]):
    ex = jax.tree.map(lambda x: x[i], batch)
    phi0 = problem.init_state(params, ex)
    x0, unravel = ravel_pytree(phi0)
    energy = lambda x: problem.energy(params, unravel(x), ex)
    field = jax.jit(lambda x: -jax.grad(energy)(x))
    res = fp.solve_fixed_point(field, x0, fp.make_strategy(
        "sgd", learning_rate=0.01, momentum=0.95, nesterov=True), rtol=1e-12,
        max_steps=steps, steps_per_check=1)
    x = res.value
    print(f"  tight free phase: task {i}, residual {float(res.residual):.2e}, "
          f"{int(res.iterations)} steps", flush=True)
    hess = jax.jit(jax.hessian(energy))(x)
    gl = ravel_pytree(problem.loss_grad(unravel(x), ex))[0]
    grads.append(lam * np.linalg.solve(np.asarray(hess), np.asarray(gl)))
    resid.append(float(res.residual / jnp.linalg.norm(x)))
  return np.mean(grads, axis=0), float(np.max(resid))


def _compare(g: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
  cos = float(g @ ref / (np.linalg.norm(g) * np.linalg.norm(ref) + 1e-300))
  return cos, float(np.linalg.norm(g) / (np.linalg.norm(ref) + 1e-300))


def _run_cell(net: str, n_way: int, args) -> list[tuple]:
  print(f"cell {net} {n_way}-way", flush=True)
  c, problem, params, batch = _setup(net, n_way, args)
  specs = _solver_specs(c)
  t0 = time.time()
  exact, resid = _exact_implicit(problem, params, batch, args.tight_steps)
  trunc = None
  rows = []
  for name in ["bp"] + [k for k in specs if k != "bp"]:
    t = time.time()
    est = jax.jit(lambda p, b, s=specs[name]: s(problem, p, (), b, jax.random.key(0)))(
        params, batch)
    g = np.asarray(ravel_pytree(est.grads)[0])
    if name == "bp":
      trunc = g
    conv = float(np.mean(np.asarray(est.stats["free/converged"])))
    rows.append((net, n_way, name, *_compare(g, exact), *_compare(g, trunc), conv,
                 round(time.time() - t, 1)))
    print(rows[-1], flush=True)
  rows.append((net, n_way, "(b) truncated vs (a)", *_compare(trunc, exact), 1.0, 1.0,
               resid, round(time.time() - t0, 1)))
  return rows


def _write(rows: list[tuple], args, seconds: float) -> None:
  lines = ["# Meta-gradient alignment on real Omniglot tasks", "",
           f"Command: `python -m benchmarks.meta_gradient_alignment --channels {args.channels} "
           f"--n-query {args.n_query} --tasks {args.tasks} --tight-steps {args.tight_steps}`",
           f"Machine: {platform.machine()} CPU, 2 cores shared, no accelerator; float64; "
           f"{seconds / 60:.1f} min.", "",
           f"Tasks: meta-training tasks of step 0 (seed 0), {args.tasks} per cell, 1-shot, "
           f"{args.n_query} query images per class, conv-4 with {args.channels} channels "
           "(shrunk from 64 to fit the CPU), initial omega. Solver options: "
           "`configs/omniglot.py` preset quick (+smooth for the smooth net), "
           "steps_per_check 1. (a) = exact implicit gradient at a tightly converged "
           "phi* (dense Hessian); (b) = jax.grad through the truncated inner loop (bp). "
           "For the `(b) truncated vs (a)` row the last two columns are the largest "
           "relative residual of the tight free phase and the cell's time.", "",
           "| net | way | solver | cos (a) | norm ratio (a) | cos (b) | norm ratio (b) "
           "| free converged | s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                   for v in r) + " |")
  atomic_write_text(OUT, "\n".join(lines) + "\n")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--channels", type=int, default=8)
  p.add_argument("--n-query", type=int, default=5)
  p.add_argument("--tasks", type=int, default=2)
  p.add_argument("--tight-steps", type=int, default=3000)
  p.add_argument("--nets", default="smooth,maxpool")
  p.add_argument("--ways", default="5,20")
  args = p.parse_args()
  t = time.time()
  rows = []
  for net in args.nets.split(","):
    for way in (int(w) for w in args.ways.split(",")):
      rows += _run_cell(net, way, args)
      _write(rows, args, time.time() - t)
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
