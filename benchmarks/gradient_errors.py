"""Max relative error of every core solver's gradient against the exact answer.

Exact answers (tests/zoo.py): eq. 5 with dense Jacobians and a dense inverse
for bp / rbp / imaml; for the LCP circuits at alpha = 0.05, central finite
differences of min_phi 1/2||f||^2 + L/alpha (Newton, float64) along the update
and two random directions. Float64 throughout, so the numbers measure the
solvers, not float32 rounding.

    python -m benchmarks.gradient_errors   # writes benchmarks/results/gradient_errors.md
"""

import os
import pathlib
import platform

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np
from jax.flatten_util import ravel_pytree

import solvers
from tests import zoo

FREE = {"strategy": "anderson", "strategy_options": {"dt": 0.3}, "rtol": 1e-12,
        "max_steps": 5000}
CONTROLLED = {"strategy": "anderson", "strategy_options": {"dt": 0.2, "memory": 8},
              "rtol": 1e-12, "max_steps": 20000}
CASES = {
    "bp (400 unrolled Euler steps, dt 0.3)": ("bp", {"num_steps": 400, "free": {
        "strategy": "euler", "strategy_options": {"dt": 0.3}}}),
    "rbp (fixed-point adjoint)": ("rbp", {"adjoint": {"rtol": 1e-12, "max_steps": 5000,
                                                      "strategy_options": {"dt": 0.3}}}),
    "rbp (Anderson adjoint)": ("rbp", {"adjoint": {"rtol": 1e-12, "max_steps": 5000,
                                                   "strategy": "anderson",
                                                   "strategy_options": {"dt": 0.3}}}),
    "imaml (CG adjoint)": ("imaml", {"adjoint": {"rtol": 1e-13, "max_steps": 200}}),
    "lcp_di (alpha 0.05)": ("lcp_di", {"alpha": 0.05, "controlled": CONTROLLED}),
    "lcp_ebd (alpha 0.05)": ("lcp_ebd", {"alpha": 0.05, "controlled": CONTROLLED}),
    "lcp_kp (feedback = W, alpha 0.05)": ("lcp_kp", {"alpha": 0.05, "controlled": CONTROLLED,
                                                     "feedback_init": "copy",
                                                     "weight_decay": 0.0}),
}


def lcp_reference(problem, params, batch, alpha, directions):
  flat, unravel = ravel_pytree(params)
  size = jax.tree.leaves(batch)[0].shape[0]
  exs = [jax.tree.map(lambda a: a[i], batch) for i in range(size)]
  value = lambda p: sum(float(zoo.augmented_energy_value(problem, p, ex, alpha)[0])
                        for ex in exs) / size
  eps = 1e-5
  return np.array([(value(unravel(flat + eps * d)) - value(unravel(flat - eps * d)))
                   / (2 * eps) for d in directions])


def main():
  rows = []
  for pname, make in zoo.ZOO.items():
    problem, params, batch = make()
    exact = np.asarray(ravel_pytree(zoo.exact_implicit_gradient(problem, params, batch))[0])
    for label, (sname, opts) in CASES.items():
      solver = solvers.get_solver(sname, **{"free": FREE, **opts})
      if solver.needs_energy and not problem.has_energy:
        continue
      sp = solver.init(problem, params, jax.random.key(0))
      est = jax.jit(lambda p, sp, b: solver(problem, p, sp, b, jax.random.key(0)))(params, sp, batch)
      g = np.asarray(ravel_pytree(est.grads)[0])
      if sname.startswith("lcp"):
        rng = np.random.default_rng(0)
        dirs = [g / np.linalg.norm(g)] + [rng.standard_normal(g.shape) for _ in range(2)]
        ref = lcp_reference(problem, params, batch, opts["alpha"], dirs)
        err = float(np.max(np.abs(np.array([d @ g for d in dirs]) - ref)) / np.max(np.abs(ref)))
      else:
        err = float(np.max(np.abs(g - exact)) / np.max(np.abs(exact)))
      rows.append((pname, label, err))
      print(f"{pname:18s} {label:36s} {err:.1e}", flush=True)

  out = ROOT / "benchmarks" / "results" / "gradient_errors.md"
  lines = [
      "# Gradient errors against exact answers",
      "",
      "Command: `python -m benchmarks.gradient_errors`  ",
      f"Machine: {platform.machine()} CPU ({os.cpu_count()} cores), jax {jax.__version__}, "
      "CPU backend.",
      "",
      "Max relative error = max |g - g_exact| / max |g_exact| over all parameter entries "
      "(bp, rbp, imaml: exact = eq. 5 with a dense inverse at a Newton equilibrium). For "
      "the LCP circuits the exact answer is grad_theta of min_phi 1/2||f||^2 + L/alpha "
      "(section 2.4, beta = 1/alpha) by central finite differences (eps 1e-5) of a "
      "float64 Newton solve, along the update and 2 random directions; the error is "
      "relative to the largest directional derivative, so ~1e-9 is the "
      "finite-difference floor. All in float64.",
      "",
      "| problem | solver | max relative error |",
      "| --- | --- | ---: |",
  ]
  lines += [f"| {p} | {s} | {e:.1e} |" for p, s, e in rows]
  tmp = out.with_suffix(".tmp")
  tmp.write_text("\n".join(lines) + "\n")
  tmp.replace(out)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
