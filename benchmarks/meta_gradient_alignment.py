"""Every meta-solver's update against the exact meta-gradients, on real Omniglot tasks.

``python -m benchmarks.meta_gradient_alignment [--channels 4] [--tasks 8]``
writes ``benchmarks/results/meta_gradient_alignment.md``.

For each net (smooth, max-pool), task family (5-way and 20-way 1-shot) and slow
weights omega (``init``: the initial omega; ``trained``: after ``--meta-steps``
FOMAML meta-steps at the same config), on ``--tasks`` real meta-training tasks
never seen in those meta-steps, in float64:

* (a) the exact implicit meta-gradient (eq. 5 for eq. 16): phi* from the free
  phase run ``--tight-steps`` steps, then ``g = lambda (hess E)^{-1} grad L_eval``
  with the dense Hessian of E (the nets are small enough);
* (b) the exact gradient of the truncated inner procedure: ``jax.grad`` through
  the configured inner loop (the ``bp`` solver with the free budget);
* every solver's update (lcp at several alpha, cml at two beta, imaml, rbp, bp,
  fomaml, t1t2, reptile) with the options of ``configs/omniglot.py`` (quick
  preset, plus ``+smooth`` for the smooth net), and the equilibrium solvers again
  with every phase solved tightly (``tight``: free phase, adjoint, nudged and
  controlled phases at rtol 1e-10 with ``--tight-steps`` steps): the theory's
  claims (imaml, rbp -> (a); cml -> (a) as beta -> 0) are about those.

Every row lists each phase's converged fraction and residual reduction, so an
update read off a state that is not an equilibrium is visible as such.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

jax.config.update("jax_enable_x64", True)

import problems  # noqa: E402
import solvers  # noqa: E402
from bilevel import fixed_point as fp  # noqa: E402
from bilevel.train import init_train_state, make_train_step  # noqa: E402
from configs import omniglot as omniglot_config  # noqa: E402
from launch import schema  # noqa: E402
from launch.records import atomic_write_text  # noqa: E402

OUT = "benchmarks/results/meta_gradient_alignment.md"
LCP_ALPHAS = (10.0, 1.0, 0.1, 0.01)
CML_BETAS = (0.03, 0.003)
OTHERS = ("imaml", "rbp", "bp", "fomaml", "t1t2", "reptile")
TIGHT_OTHERS = ("imaml", "rbp")


def _f64(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64)
                      if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)


HELD_OUT_STEP = 10_000  # the tasks compared on: a batch no meta-step has seen


def _setup(net: str, n_way: int, omega: str, args) -> tuple[Any, Any, Any, Any]:
  """(config, problem, omega in float64, held-out batch of ``--tasks`` tasks)."""
  preset = "quick+smooth" if net == "smooth" else "quick"
  c = omniglot_config.get_config(preset)
  c.problem_options.update(dict(n_way=n_way, channels=args.channels, n_query=args.n_query,
                                blocks=4))
  c.batch_size = args.tasks
  task = problems.make_task(c)
  params = task.problem.init_params(jax.random.key(0), task.example)
  if omega == "trained":
    params = _meta_train(c, task, params, args.meta_steps)
  return c, task.problem, _f64(params), _f64(task.train_batch(HELD_OUT_STEP))


def _meta_train(c, task, params, steps: int) -> Any:
  """omega after ``steps`` FOMAML meta-steps (the config's inner loop and optimizer lr)."""
  solver = solvers.get_solver("fomaml", **schema.to_dict(c.solvers.fomaml))
  opt = optax.adam(c.optimizer.learning_rate)
  state = init_train_state(task.problem, solver, opt, jax.random.key(0), task.example,
                           params=params)
  step = make_train_step(task.problem, solver, opt)
  losses = []
  for i in range(steps):
    state, metrics = step(state, task.train_batch(i))
    losses.append(float(metrics["loss"]))
  print(f"  meta-trained omega: {steps} fomaml steps, query loss "
        f"{statistics.mean(losses[:10]):.3f} -> {statistics.mean(losses[-10:]):.3f}",
        flush=True)
  return state.params


def _tight(phase: dict, steps: int) -> dict:
  return dict(phase, rtol=1e-10, max_steps=steps, steps_per_check=1)


def _solver_specs(c, tight_steps: int, alphas: tuple[float, ...] = LCP_ALPHAS,
                  betas: tuple[float, ...] = CML_BETAS) -> dict[str, Any]:
  """name -> solver: the preset's options, then (``tight_steps`` > 0) the equilibrium
  solvers solved tightly."""
  opts = {k: schema.to_dict(c.solvers[k]) for k in c.solvers}
  spc1 = lambda d: dict(d, steps_per_check=1)  # small compiles; same steps
  free = spc1(opts["lcp"]["free"])
  tight_free = _tight(free, tight_steps)
  out = {}
  variants = [("", free, spc1)] + [(" tight", tight_free, lambda d: _tight(d, tight_steps))
                                   ] * bool(tight_steps)
  for label, fr, phase in variants:
    for a in alphas:
      controlled = phase(opts["lcp"]["controlled"])
      controlled["strategy_options"] = dict(
          controlled["strategy_options"], learning_rate=omniglot_config.controlled_learning_rate(
              free["strategy_options"]["learning_rate"], a))
      lcp = dict(opts["lcp"], free=fr, alpha=a, k_i=1.0 / a, controlled=controlled)
      out[f"lcp a={a:g}{label}"] = solvers.get_solver("lcp", **lcp)
    for b in betas:
      out[f"cml b={b:g}{label}"] = solvers.get_solver(
          "cml", **dict(opts["cml"], free=fr, beta=b, nudged=phase(opts["cml"]["nudged"])))
    for name in OTHERS if not label else TIGHT_OTHERS:
      o = dict(opts[name], free=fr)
      if name == "bp":  # (b): same gradient, the unrolled loop's memory bounded (20-way)
        o["remat"] = True
      if "adjoint" in o:
        o["adjoint"] = phase(dict(o["adjoint"], steps_per_check=1))
      out[name + label] = solvers.get_solver(name, **o)
  return out


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(","))


def _exact_implicit(problem, params, batch, steps: int,
                    strategy: fp.Strategy) -> tuple[np.ndarray, float]:
  """(a): lambda (hess E(phi*))^{-1} grad L_eval(phi*), batch mean; phi* tight (the
  preset's free-phase rule run to rtol 1e-12)."""
  lam = 0.5
  grads, resid = [], []
  for i in range(jax.tree.leaves(batch)[0].shape[0]):
    ex = jax.tree.map(lambda x: x[i], batch)
    phi0 = problem.init_state(params, ex)
    x0, unravel = ravel_pytree(phi0)
    energy = lambda x: problem.energy(params, unravel(x), ex)
    field = jax.jit(lambda x: -jax.grad(energy)(x))
    res = fp.solve_fixed_point(field, x0, strategy, rtol=1e-12, max_steps=steps,
                               steps_per_check=1)
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


def _phases(est) -> str:
  """``free 1.00/3e-05, adjoint ...``: converged fraction / mean residual reduction."""
  return ", ".join(f"{name} {float(np.mean(np.asarray(ph.converged))):.2f}/"
                   f"{float(np.mean(np.asarray(ph.residual_reduction))):.0e}"
                   for name, ph in est.phases.items())


def _run_cell(net: str, n_way: int, omega: str, args) -> list[tuple]:
  print(f"cell {net} {n_way}-way omega={omega}", flush=True)
  c, problem, params, batch = _setup(net, n_way, omega, args)
  specs = _solver_specs(c, args.tight_steps if net in args.tight_nets.split(",") else 0,
                        _floats(args.alphas), _floats(args.betas))
  free = c.solvers.lcp.free
  t0 = time.time()
  exact, resid = _exact_implicit(problem, params, batch, args.tight_steps, fp.make_strategy(
      free.strategy, **schema.to_dict(free.strategy_options)))
  trunc = None
  rows = []
  for name in ["bp"] + [k for k in specs if k != "bp"]:
    t = time.time()
    est = jax.jit(lambda p, b, s=specs[name]: s(problem, p, (), b, jax.random.key(0)))(
        params, batch)
    g = np.asarray(ravel_pytree(est.grads)[0])
    if name == "bp":
      trunc = g
    rows.append((net, n_way, omega, name, *_compare(g, exact), *_compare(g, trunc),
                 _phases(est), round(time.time() - t, 1)))
    print(rows[-1], flush=True)
  rows.append((net, n_way, omega, "(b) truncated vs (a)", *_compare(trunc, exact), 1.0, 1.0,
               f"tight free phase: max relative residual {resid:.1e}",
               round(time.time() - t0, 1)))
  return rows


def _command(args) -> str:
  return (f"python -m benchmarks.meta_gradient_alignment --channels {args.channels} "
          f"--n-query {args.n_query} --tasks {args.tasks} --tight-steps {args.tight_steps} "
          f"--meta-steps {args.meta_steps} --nets {args.nets} --ways {args.ways} "
          f"--omegas {args.omegas} --tight-nets {args.tight_nets} --alphas {args.alphas} "
          f"--betas {args.betas}")


def _cell(row: tuple) -> tuple[str, str, str]:
  return tuple(str(v) for v in row[:3])


def _write(rows: list[tuple], kept: dict, args, seconds: float, notes: str) -> None:
  """The table: this run's rows, and the rows (and command) of cells it did not re-run."""
  cells = list(dict.fromkeys(_cell(r) for r in rows))
  runs = {c: r for c, r in kept.items() if c not in cells}
  runs.update({c: ([r for r in rows if _cell(r) == c],
                   f"`{_command(args)}` ({platform.machine()} CPU, {os.cpu_count()} cores, "
                   f"float64; {seconds / 60:.1f} min for the run)") for c in cells})
  order = sorted(runs, key=lambda c: (c[0] != "smooth", int(c[1]), c[2] != "init", c[0]))
  lines = ["# Meta-gradient alignment on real Omniglot tasks", "",
           "Cells and the command that made each (a run may make several cells):", ""]
  lines += [f"- {'/'.join(c)}: {runs[c][1]}" for c in order]
  lines += ["",
           f"Tasks: {args.tasks} held-out meta-training tasks per cell (the batch of step "
           f"{HELD_OUT_STEP}, seed 0), 1-shot, {args.n_query} query images per class, conv-4 "
           f"with {args.channels} channels (shrunk from 64 so the dense Hessian of (a) fits), "
           f"omega `init` (initial) or `trained` ({args.meta_steps} FOMAML meta-steps). Solver "
           "options: `configs/omniglot.py` preset quick (+smooth for the smooth net), "
           "steps_per_check 1; rows marked `tight` solve every phase to rtol 1e-10 within "
           f"{args.tight_steps} steps. (a) = exact implicit gradient at a tightly converged "
           "phi* (dense Hessian); (b) = jax.grad through the configured inner loop (bp). "
           "Phases: converged fraction / mean residual reduction ||F_end|| / ||F_start|| of "
           "each phase.", "", TABLE_HEADER, "|---|---|---|---|---|---|---|---|---|---|"]
  for c in order:
    lines += [r if isinstance(r, str) else "| " + " | ".join(
        f"{v:.6g}" if isinstance(v, float) else str(v) for v in r) + " |" for r in runs[c][0]]
  atomic_write_text(OUT, "\n".join(lines) + "\n" + notes)


TABLE_HEADER = ("| net | way | omega | solver | cos (a) | norm ratio (a) | cos (b) | "
                "norm ratio (b) | phases | s |")


def _previous() -> tuple[dict, str]:
  """From the results file: {cell: (table lines, command)} and the reading kept under the
  table (everything from its first ``## `` heading)."""
  try:
    text = open(OUT).read()
  except FileNotFoundError:
    return {}, ""
  i = text.find("\n## ")
  head, notes = (text[:i], text[i:]) if i >= 0 else (text, "")
  commands = {}
  for line in head.splitlines():
    if line.startswith("- ") and ": `" in line:
      cell, command = line[2:].split(": ", 1)
      commands[tuple(cell.split("/"))] = command
  kept = {}
  for line in head.splitlines():
    parts = [p.strip() for p in line.strip("|").split("|")]
    if line.startswith("| ") and len(parts) == 10 and parts[1].isdigit():
      cell = tuple(parts[:3])
      kept.setdefault(cell, ([], commands.get(cell, "(command not recorded)")))[0].append(line)
  return kept, notes


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--channels", type=int, default=4)
  p.add_argument("--n-query", type=int, default=5)
  p.add_argument("--tasks", type=int, default=8)
  p.add_argument("--tight-steps", type=int, default=3000)
  p.add_argument("--meta-steps", type=int, default=100)
  p.add_argument("--nets", default="smooth,maxpool")
  p.add_argument("--ways", default="5,20")
  p.add_argument("--omegas", default="init,trained")
  p.add_argument("--tight-nets", default="smooth",
                 help="nets that also get the tight rows ((a) needs an equilibrium, which "
                 "the max-pool net does not have)")
  p.add_argument("--alphas", default=",".join(f"{a:g}" for a in LCP_ALPHAS),
                 help="lcp control strengths compared")
  p.add_argument("--betas", default=",".join(f"{b:g}" for b in CML_BETAS),
                 help="cml nudging strengths compared")
  args = p.parse_args()
  t = time.time()
  rows, (kept, notes) = [], _previous()
  for net in args.nets.split(","):
    for way in (int(w) for w in args.ways.split(",")):
      for omega in args.omegas.split(","):
        rows += _run_cell(net, way, omega, args)
        _write(rows, kept, args, time.time() - t, notes)
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
