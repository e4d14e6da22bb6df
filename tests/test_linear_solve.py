"""Matrix-free adjoint solves against dense solutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel import Anderson, Status
from bilevel.linear_solve import solve_stable_linear


def _stable_matrix(n=12, symmetric=False, seed=0):
  m = jax.random.normal(jax.random.key(seed), (n, n)) / jnp.sqrt(n)
  if symmetric:
    return -(m @ m.T + 0.5 * jnp.eye(n))
  return -jnp.eye(n) + 0.5 * m / jnp.linalg.norm(m, 2)


@pytest.mark.parametrize("method,symmetric,kwargs", [
    ("fixed_point", False, {}),
    ("fixed_point", False, {"strategy": Anderson(1.0)}),
    ("neumann", False, {"max_steps": 120}),
    ("cg", True, {}),
])
def test_matches_dense_solve(method, symmetric, kwargs):
  a = _stable_matrix(symmetric=symmetric)
  b = {"x": jax.random.normal(jax.random.key(3), (12,))}
  res = solve_stable_linear(lambda v: {"x": a @ v["x"]}, b, method=method,
                            rtol=1e-11, **{"max_steps": 2000, **kwargs})
  np.testing.assert_allclose(res.value["x"], np.linalg.solve(a, b["x"]), rtol=1e-8,
                             atol=1e-10)
  if method != "neumann":
    assert int(res.status) == Status.CONVERGED


def test_reports_failure_instead_of_raising():
  a = jnp.eye(3)  # unstable for the adjoint dynamics dv/dt = A v - b
  res = jax.jit(lambda b: solve_stable_linear(lambda v: a @ v, b, max_steps=5000))(
      jnp.ones(3))
  assert not bool(res.converged)
  assert int(res.status) in (Status.NONFINITE, Status.MAX_STEPS)


def test_unknown_method():
  with pytest.raises(ValueError, match="fixed_point"):
    solve_stable_linear(lambda v: v, jnp.ones(2), method="lu")


@pytest.mark.parametrize("method,kwargs", [
    ("fixed_point", {"strategy": Anderson(0.5)}), ("fixed_point", {}), ("cg", {})])
def test_every_block_of_the_solution_is_accurate(method, kwargs):
  """Issue 12 item 1: a residual small relative to ||b|| leaves a small block of x
  1000x less accurate than the rest; the per-block rule does not stop there."""
  d = {"small": -jnp.linspace(0.5, 1.0, 4), "big": -jnp.ones(3)}
  b = {"small": jnp.ones(4), "big": jnp.full(3, -1000.0)}
  matvec = lambda v: jax.tree.map(jnp.multiply, d, v)
  res = solve_stable_linear(matvec, b, method=method, rtol=1e-7, max_steps=500, **kwargs)
  assert int(res.status) == Status.CONVERGED
  exact = jax.tree.map(jnp.divide, b, d)
  np.testing.assert_allclose(res.value["small"], exact["small"], rtol=1e-6)
  assert float(res.block_relative_residual) <= 1e-7
  np.testing.assert_allclose(res.relative_residual,
                             res.residual / np.linalg.norm(np.r_[b["small"], b["big"]]))
