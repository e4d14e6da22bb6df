"""The equilibrium engine: convergence, failure reporting, acceleration."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel import (Anderson, Euler, OptaxStrategy, Status, make_strategy,
                     solve_fixed_point, unrolled_fixed_point)


def _contraction(n=20, rho=0.9, seed=0):
  """f(z) = tanh(A z + b) - z with ||A|| = rho < 1: a contraction of the map."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  a = jax.random.normal(k1, (n, n))
  a = rho * a / jnp.linalg.norm(a, 2)
  b = jax.random.normal(k2, (n,))
  return lambda z: jnp.tanh(a @ z + b) - z, a, b


@pytest.mark.parametrize("strategy", [Euler(1.0), Euler(0.5), Anderson(1.0, memory=5)])
def test_converges_on_contraction(strategy):
  field, a, b = _contraction()
  res = jax.jit(lambda z0: solve_fixed_point(field, z0, strategy, rtol=1e-10,
                                             max_steps=2000))(jnp.zeros(20))
  assert bool(res.converged) and int(res.status) == Status.CONVERGED
  np.testing.assert_allclose(res.value, jnp.tanh(a @ res.value + b), atol=1e-9)
  assert float(res.residual) <= 1e-10 * float(jnp.linalg.norm(res.value)) + 1e-15
  assert 0 < int(res.iterations) < 2000


def test_anderson_needs_fewer_iterations():
  # A slowly contracting affine map: Picard needs hundreds of steps.
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (20, 20)))
  a = q @ jnp.diag(jnp.linspace(0.0, 0.97, 20)) @ q.T
  field = lambda z: a @ z + 1.0 - z
  z0 = jnp.zeros(20)
  plain = solve_fixed_point(field, z0, Euler(1.0), rtol=1e-8, max_steps=5000)
  accel = solve_fixed_point(field, z0, Anderson(1.0, memory=6), rtol=1e-8, max_steps=5000)
  assert bool(plain.converged) and bool(accel.converged)
  assert int(accel.iterations) < int(plain.iterations) / 2


def test_divergent_map_reports_without_raising():
  field = lambda z: 1.5 * z + 1.0  # unstable: Euler grows geometrically to inf
  res = jax.jit(lambda z0: solve_fixed_point(field, z0, rtol=1e-6, max_steps=10_000))(
      jnp.ones(3))
  assert not bool(res.converged)
  assert int(res.status) == Status.NONFINITE
  assert int(res.iterations) < 10_000  # stopped early on the non-finite value


def test_oscillation_hits_max_steps():
  rot = jnp.array([[0.0, -1.0], [1.0, 0.0]])
  res = solve_fixed_point(lambda z: rot @ z - 0.0 * z, jnp.ones(2), Euler(0.01),
                          rtol=1e-8, max_steps=50)
  assert int(res.status) == Status.MAX_STEPS and int(res.iterations) == 50


def test_vmap_one_diverging_example_does_not_spoil_the_batch():
  scales = jnp.array([-0.5, 2.0, -0.8])  # example 1 diverges

  def one(s):
    return solve_fixed_point(lambda z: s * z + 1.0, jnp.zeros(2), Euler(1.0),
                             rtol=1e-9, max_steps=500)

  res = jax.jit(jax.vmap(one))(scales)
  np.testing.assert_array_equal(res.status, [Status.CONVERGED, Status.NONFINITE,
                                             Status.CONVERGED])
  np.testing.assert_allclose(res.value[0], 2.0, rtol=1e-8)
  np.testing.assert_allclose(res.value[2], 1.25, rtol=1e-8)
  # Per-example stopping: each converged example keeps its own iteration count.
  alone = one(scales[0])
  assert int(res.iterations[0]) == int(alone.iterations)


def test_pytree_states_and_steps_per_check():
  def field(z):
    return {"a": 0.5 * jnp.tanh(z["b"]) - z["a"], "b": (0.3 * z["a"] + 1.0) - z["b"]}

  z0 = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
  one = solve_fixed_point(field, z0, Anderson(1.0), rtol=1e-9, max_steps=400)
  chunked = solve_fixed_point(field, z0, Anderson(1.0), rtol=1e-9, max_steps=400,
                              steps_per_check=4)
  assert bool(one.converged) and bool(chunked.converged)
  assert int(chunked.iterations) % 4 == 0
  assert int(chunked.iterations) >= int(one.iterations)
  np.testing.assert_allclose(one.value["a"], chunked.value["a"], atol=1e-8)


def test_optax_strategy_minimises_an_energy():
  target = jnp.array([1.0, -2.0, 3.0])
  field = lambda z: -(z - target)  # -grad of 1/2 ||z - target||^2
  res = solve_fixed_point(field, jnp.zeros(3),
                          OptaxStrategy(optax.sgd(0.1, momentum=0.9)),
                          rtol=1e-8, max_steps=2000)
  assert bool(res.converged)
  np.testing.assert_allclose(res.value, target, atol=1e-6)
  assert isinstance(make_strategy("sgd", learning_rate=0.1), OptaxStrategy)
  with pytest.raises(ValueError, match="unknown fixed-point strategy"):
    make_strategy("nonsense")


def test_unrolled_is_differentiable_and_matches_implicit_gradient():
  # z* = tanh(w z* + x) for scalar w; dz*/dw = tanh'(.) z* / (1 - w tanh'(.)).
  def final(w):
    res = unrolled_fixed_point(lambda z: jnp.tanh(w * z + 0.7) - z, jnp.zeros(()),
                               Euler(1.0), num_steps=200)
    return res.value

  w = 0.4
  z = final(w)
  d = 1 - jnp.tanh(w * z + 0.7) ** 2
  np.testing.assert_allclose(jax.grad(final)(w), d * z / (1 - w * d), rtol=1e-10)
