"""The stability check of bilevel/stability.py against dense eigenvalues (issue 12, item 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import solvers
from bilevel import BilevelProblem, Status, solve_fixed_point
from bilevel.stability import leading_eigenvalue


def _matrix(eigen_blocks, seed=0):
  """``V D V^-1`` with D block diagonal (1x1 real, 2x2 ``[[a, -b], [b, a]]``
  for a complex pair a +- ib) and V a well-conditioned random basis."""
  blocks = [np.array([[a, -b], [b, a]]) if b else np.array([[a]]) for a, b in eigen_blocks]
  n = sum(len(b) for b in blocks)
  d = np.zeros((n, n))
  i = 0
  for b in blocks:
    d[i:i + len(b), i:i + len(b)] = b
    i += len(b)
  v = np.eye(n) + 0.3 * np.random.default_rng(seed).standard_normal((n, n)) / np.sqrt(n)
  return v @ d @ np.linalg.inv(v)


CLUSTER = [(-1.0, 0.0), (-0.8, 0.3), (-1.3, 0.0), (-0.6, 0.0), (-1.6, 0.5), (-0.9, 0.0),
           (-1.1, 0.0), (-0.7, 0.0)]
CASES = {
    "real unstable": [(0.3, 0.0)] + CLUSTER,
    "complex unstable": [(0.2, 0.8)] + CLUSTER,
    "stable real": [(-0.2, 0.0)] + CLUSTER,
    "stable complex": [(-0.3, 0.4)] + CLUSTER,
    "stiff stable": [(-0.25, 0.0), (-8.0, 0.0), (-5.0, 1.0)] + CLUSTER,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy_eigvals(name):
  a = _matrix(CASES[name])
  true = np.max(np.linalg.eigvals(a).real)
  # A pytree state: the dense matrix acts on the flattened {"x", "y"} vector.
  z = {"x": jnp.zeros(4), "y": jnp.zeros((a.shape[0] - 4,))}
  _, unravel = ravel_pytree(z)
  field = lambda s: unravel(jnp.asarray(a) @ ravel_pytree(s)[0])
  est, stable = jax.jit(lambda key: leading_eigenvalue(field, z, key, 60))(jax.random.key(0))
  assert abs(float(est) - true) < 0.02 * max(1.0, abs(true)), (float(est), true)
  assert bool(stable) == (true < 0)


def test_vmaps_over_examples_and_handles_scalars_and_nan():
  mats = jnp.stack([jnp.asarray(_matrix(CASES[k])) for k in ("real unstable", "stable real")])

  def one(a, key):
    return leading_eigenvalue(lambda s: a @ s, jnp.zeros(a.shape[0]), key, 60)

  keys = jax.random.split(jax.random.key(1), 2)
  est, stable = jax.jit(jax.vmap(one))(mats, keys)
  np.testing.assert_allclose(est, [0.3, -0.2], atol=0.02)
  np.testing.assert_array_equal(stable, [False, True])
  # A one-unit state, stable and unstable.
  for lam in (-0.7, 0.4):
    est, stable = leading_eigenvalue(lambda s: lam * s, jnp.zeros(1), jax.random.key(2), 5)
    np.testing.assert_allclose(est, lam, rtol=1e-12)
    assert bool(stable) == (lam < 0)
  # A non-finite Jacobian gives (nan, False), not an exception, under jit.
  est, stable = jax.jit(lambda z: leading_eigenvalue(lambda s: jnp.sqrt(s), z,
                                                     jax.random.key(3), 5))(jnp.zeros(3))
  assert np.isnan(float(est)) and not bool(stable)


def _bistable_problem(n=6, gain=1.3, seed=0):
  """f = -phi + W tanh(phi) + 1e-3 U x with a symmetric W of top eigenvalue
  ``gain``: phi ~ 0 is a fixed point with max Re eig(d_phi f) ~ gain - 1, unstable
  for gain > 1, and the dynamics settle at one of the two stable states away from 0."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  w = jnp.asarray(q @ np.diag(np.linspace(-0.5, gain, n)) @ q.T)
  params = {"W": w, "U": jnp.asarray(rng.standard_normal((n, 2)))}
  dynamics = lambda p, phi, ex: -phi + p["W"] @ jnp.tanh(phi) + 1e-3 * p["U"] @ ex["x"]
  loss = lambda y, ex: 0.5 * jnp.sum((y - ex["target"]) ** 2)
  data = {"x": jnp.asarray(rng.standard_normal((3, 2))),
          "target": jnp.asarray(rng.standard_normal((3, 2)))}
  problem = BilevelProblem(dynamics=dynamics, loss=loss, output=lambda phi: phi[-2:],
                           init_state=lambda p, ex: 0.1 * jnp.ones(n), name="bistable",
                           example=jax.tree.map(lambda a: a[0], data))
  return problem, params, data


def test_flags_the_unstable_equilibrium_anderson_reports_converged():
  """Issue 12 item 3: Anderson lands on the fixed point near 0 (max Re eig +0.30),
  RBP reports every status CONVERGED; the check flags each example."""
  problem, params, data = _bistable_problem()
  anderson = {"strategy": "anderson", "rtol": 1e-10, "max_steps": 500}
  rbp = solvers.get_solver("rbp", free=anderson, adjoint=anderson)
  est = jax.jit(lambda p, b: rbp(problem, p, (), b, jax.random.key(0)))(params, data)
  assert np.all(est.stats["free/status"] == Status.CONVERGED)
  assert np.all(est.stats["adjoint/status"] == Status.CONVERGED)
  free = rbp.free_equilibrium(problem, params, data)
  checked = solvers.get_solver("rbp", free=anderson, adjoint=anderson,
                               stability_check_steps=20)
  est = jax.jit(lambda p, b: checked(problem, p, (), b, jax.random.key(0)))(params, data)
  lam, stable = est.extras["free/max_real_eig"], est.extras["free/stable"]
  for i in range(3):
    ex = jax.tree.map(lambda a: a[i], data)
    jac = jax.jacobian(lambda s: problem.f(params, s, ex))(free.value[i])
    true = np.max(np.linalg.eigvals(np.asarray(jac)).real)
    assert abs(true - 0.30) < 0.01 and abs(float(lam[i]) - true) < 1e-3
  assert not np.any(stable)
  # Forward Euler (the physical dynamics) leaves that point for a stable one.
  euler = solve_fixed_point(lambda s: problem.f(params, s, jax.tree.map(lambda a: a[0], data)),
                            0.1 * jnp.ones(6), rtol=1e-10, max_steps=5000)
  assert bool(euler.converged)
  lam0, stable0 = leading_eigenvalue(
      lambda s: problem.f(params, s, jax.tree.map(lambda a: a[0], data)), euler.value,
      jax.random.key(1), 20)
  assert bool(stable0) and float(lam0) < -0.05
