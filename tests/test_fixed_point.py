"""The equilibrium engine: convergence, failure reporting, acceleration."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel import (Anderson, Euler, OptaxStrategy, RestartingNesterov, Status,
                     make_strategy, solve_fixed_point, unrolled_fixed_point)
from bilevel.fixed_point import compaction_sizes, solve_compacted


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


def _stiff_quadratic(top: float, n: int = 20, seed: int = 2):
  """-grad of 1/2 z'Hz - b'z with eigenvalues of H from 0.5 to ``top``; its minimiser."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  q, _ = jnp.linalg.qr(jax.random.normal(k1, (n, n)))
  h = q @ jnp.diag(jnp.geomspace(0.5, top, n)) @ q.T
  b = jax.random.normal(k2, (n,))
  return (lambda z: b - h @ z), jnp.linalg.solve(h, b)


def test_restarting_nesterov_converges_where_momentum_sgd_oscillates():
  # Nesterov 0.95 at lr 0.01 is stable only for curvature < 1.34 / lr = 134.
  strategies = {"plain": make_strategy("sgd", learning_rate=0.01, momentum=0.95,
                                       nesterov=True),
                "restarting": make_strategy("restarting_nesterov", learning_rate=0.01,
                                            momentum=0.95)}
  for top, plain_converges in ((50.0, True), (400.0, False)):
    field, z_star = _stiff_quadratic(top)
    res = {k: jax.jit(lambda z0, s=s: solve_fixed_point(field, z0, s, rtol=1e-9,
                                                        max_steps=5000))(jnp.zeros(20))
           for k, s in strategies.items()}
    assert bool(res["plain"].converged) == plain_converges
    assert bool(res["restarting"].converged)
    np.testing.assert_allclose(res["restarting"].value, z_star, rtol=1e-6, atol=1e-7)


def test_restarting_nesterov_step_rules():
  rule = RestartingNesterov(learning_rate=0.1, momentum=0.5, shrink=0.5, grow=2.0,
                            patience=3)
  z = jnp.zeros(2)
  state = rule.init(z, z)
  # Forward force after a forward move: plain Nesterov step, trace kept.
  state = state._replace(last_move=jnp.array([1.0, 0.0]), trace=jnp.array([2.0, 0.0]),
                         calm_steps=jnp.asarray(1))
  z1, s1 = rule.step(z, jnp.array([1.0, 0.0]), state)
  np.testing.assert_allclose(s1.trace, [2.0, 0.0])  # 1 + 0.5 * 2
  np.testing.assert_allclose(z1, [0.1 * (1.0 + 0.5 * 2.0), 0.0])
  assert int(s1.calm_steps) == 2 and float(s1.learning_rate) == 0.1
  # The force turns against the last move: trace reset, same step size.
  z2, s2 = rule.step(z1, jnp.array([-1.0, 0.0]), s1)
  np.testing.assert_allclose(s2.trace, [-1.0, 0.0])
  assert int(s2.calm_steps) == 0 and float(s2.learning_rate) == 0.1
  # It overshoots again right after the restart: the step halves.
  _, s3 = rule.step(z2, jnp.array([1.0, 0.0]), s2)
  assert float(s3.learning_rate) == 0.05 and int(s3.calm_steps) == 0
  # After `patience` calm steps the step grows, but never above the configured one.
  calm = s3._replace(calm_steps=jnp.asarray(3), last_move=jnp.zeros(2))
  assert float(rule.step(z2, jnp.ones(2), calm)[1].learning_rate) == 0.1
  calm = calm._replace(learning_rate=jnp.asarray(0.01))
  assert float(rule.step(z2, jnp.ones(2), calm)[1].learning_rate) == 0.02


@pytest.mark.parametrize("remat", [False, True])
def test_unrolled_is_differentiable_and_matches_implicit_gradient(remat):
  # z* = tanh(w z* + x) for scalar w; dz*/dw = tanh'(.) z* / (1 - w tanh'(.)).
  def final(w):
    res = unrolled_fixed_point(lambda z: jnp.tanh(w * z + 0.7) - z, jnp.zeros(()),
                               Euler(1.0), num_steps=200, remat=remat)
    return res.value

  w = 0.4
  z = final(w)
  d = 1 - jnp.tanh(w * z + 0.7) ** 2
  np.testing.assert_allclose(jax.grad(final)(w), d * z / (1 - w * d), rtol=1e-10)


def test_remat_unrolled_gradient_equals_the_stored_one_through_momentum():
  """Recomputing each step in the backward pass changes memory, not the gradient, also
  through a strategy with state (the restarting rule's trace, step and counters)."""
  field, _ = _stiff_quadratic(400.0)
  rule = RestartingNesterov(0.01, 0.95)

  def loss(scale, remat):
    res = unrolled_fixed_point(lambda z: scale * field(z), jnp.zeros(20), rule,
                               num_steps=150, remat=remat)
    return jnp.sum(res.value ** 2)

  stored, recomputed = (jax.grad(loss)(1.0, r) for r in (False, True))
  assert abs(float(stored)) > 1e-3
  np.testing.assert_allclose(recomputed, stored, rtol=1e-10)


def _two_scales(z):
  """A small block (target 1, rate 1) beside a big one (target 1000, already there)."""
  return {"small": 1.0 - z["small"], "big": 1000.0 - z["big"]}


def test_every_block_meets_its_own_tolerance():
  # Issue 12 item 1: a whole-state rule lets the small block stop 1000x early.
  z0 = {"small": jnp.zeros(3), "big": jnp.full(3, 1000.0)}
  res = solve_fixed_point(_two_scales, z0, Euler(0.5), rtol=1e-6, max_steps=2000)
  assert bool(res.converged)
  np.testing.assert_allclose(res.value["small"], 1.0, rtol=2e-6)
  assert float(res.block_relative_residual) <= 1e-6
  # The whole-state residual is reported too (and is ~1000x smaller, relatively).
  assert float(res.relative_residual) < 2e-3 * float(res.block_relative_residual)
  # unrolled_fixed_point judges its last iterate by the same rule: 14 halvings
  # of the small block's error meet the old whole-state test, not this one.
  unrolled = unrolled_fixed_point(_two_scales, z0, Euler(0.5), num_steps=14, rtol=1e-6)
  assert not bool(unrolled.converged) and int(unrolled.status) == Status.MAX_STEPS
  assert float(unrolled.residual) <= 1e-6 * float(jnp.sqrt(3.0) * 1000)


def test_block_tending_to_zero_meets_the_floor():
  # b decays to exactly 0: relative to itself its residual never shrinks, so a
  # block's scale is floored at block_floor * ||z|| (else only atol could stop it).
  field = lambda z: {"a": 1.0 - z["a"], "b": -z["b"]}
  z0 = {"a": jnp.zeros(2), "b": jnp.ones(2)}
  res = solve_fixed_point(field, z0, Euler(0.5), rtol=1e-6, max_steps=200)
  assert bool(res.converged) and float(jnp.max(jnp.abs(res.value["b"]))) < 1e-8
  stuck = solve_fixed_point(field, z0, Euler(0.5), rtol=1e-6, max_steps=200, block_floor=0.0)
  assert int(stuck.status) == Status.MAX_STEPS
  with_atol = solve_fixed_point(field, z0, Euler(0.5), rtol=1e-6, atol=1e-9, max_steps=200,
                                block_floor=0.0)
  assert bool(with_atol.converged)


def test_quorum_stops_the_batch_when_enough_examples_converged():
  """A vmapped batch with one very slow example: with quorum 3/4 the batch stops when
  the three others converge; the slow one is reported MAX_STEPS, not converged."""
  rates = jnp.array([-0.5, -0.8, -1e-3, -0.6])

  def solve(quorum):
    def one(s):
      return solve_fixed_point(lambda z: s * z + 1.0, jnp.zeros(2), Euler(1.0), rtol=1e-9,
                               max_steps=5000, quorum=quorum, axis_name="examples")
    return jax.jit(jax.vmap(one, axis_name="examples"))(rates)

  full, cut = solve(1.0), solve(0.75)
  np.testing.assert_array_equal(full.status, [Status.CONVERGED, Status.CONVERGED,
                                              Status.MAX_STEPS, Status.CONVERGED])
  assert int(full.iterations[2]) == 5000
  np.testing.assert_array_equal(cut.status, full.status)
  fast = jnp.array([0, 1, 3])
  np.testing.assert_array_equal(cut.iterations[fast], full.iterations[fast])
  np.testing.assert_array_equal(cut.value[fast], full.value[fast])
  assert int(cut.iterations[2]) == int(jnp.max(full.iterations[fast])) < 100
  with pytest.raises(ValueError, match="quorum"):
    solve_fixed_point(lambda z: -z, jnp.zeros(2), quorum=0.0)


@pytest.mark.parametrize("strategy,steps_per_check", [(Euler(0.7), 1),
                                                      (Anderson(1.0, memory=4), 3)])
def test_compaction_gives_every_example_its_vmapped_result(strategy, steps_per_check):
  """solve_compacted = jax.vmap(solve_fixed_point) per example -- iterates, iteration
  counts and statuses -- on a batch whose examples need from ~20 to 3000+ steps,
  with one diverging (NONFINITE) and one unsettled (MAX_STEPS) example."""
  rates = jnp.array([0.9, 0.02, 0.5, -0.3, 0.7, 0.004, 1e-4, 0.6, 0.05, 0.8, 0.3])
  shifts = jnp.linspace(-1.0, 1.0, rates.shape[0])

  def make_field(inp):
    rate, shift = inp
    # A nonlinear, per-example field; rate < 0 makes the example diverge.
    return lambda z: {"a": rate * (jnp.tanh(z["b"]) + shift - z["a"]),
                      "b": rate * (0.5 * z["a"] - z["b"])}

  z0 = {"a": jnp.zeros((rates.shape[0], 3)), "b": jnp.ones((rates.shape[0], 3))}
  opts = dict(rtol=1e-9, max_steps=3000, steps_per_check=steps_per_check)
  vmapped = jax.jit(jax.vmap(lambda i, z: solve_fixed_point(make_field(i), z, strategy,
                                                            **opts)))((rates, shifts), z0)
  compacted = jax.jit(lambda i, z: solve_compacted(make_field, i, z, strategy, stages=3,
                                                   **opts))((rates, shifts), z0)
  statuses = np.asarray(vmapped.status)
  if isinstance(strategy, Euler):  # (Anderson solves the fixed point of every example)
    assert {Status.CONVERGED, Status.MAX_STEPS, Status.NONFINITE} <= set(statuses.tolist())
  np.testing.assert_array_equal(compacted.status, statuses)
  np.testing.assert_array_equal(compacted.iterations, vmapped.iterations)
  finite = statuses != Status.NONFINITE
  for key in ("a", "b"):
    np.testing.assert_allclose(compacted.value[key][finite], vmapped.value[key][finite],
                               rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(compacted.residual[finite], vmapped.residual[finite],
                             rtol=1e-9, atol=1e-15)


def test_compaction_sizes_halve_down_to_one():
  assert compaction_sizes(64, 3) == [64, 32, 16, 8]
  assert compaction_sizes(5, 10) == [5, 3, 2, 1]
  assert compaction_sizes(7, 0) == [7]
