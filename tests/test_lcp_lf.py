"""lcp_lf (solvers/lcp_lf.py): the eq. 13 steady state and its (modified) update
against a dense Newton solve, and the noise-driven Q rule approaching the
column-space condition of section 3.1.1 on one sample."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
from problems import mnist
from test_mnist import N_OUT, assert_tree_close, ce_grad, dense, dense_grads, newton, small
import zoo
from zoo import tanh_rnn


def lf_solver(**options):
  return solvers.get_solver("lcp_lf", **{
      "free": dict(rtol=1e-11, max_steps=20000),
      "controlled": dict(rtol=1e-11, max_steps=20000), **options})


@pytest.mark.parametrize("shape", ["ff", "rnn"])
@pytest.mark.parametrize("modulated", [True, False])
def test_update_is_eq13_steady_state(shape, modulated):
  """phi* = W sigma(phi*) + U x + b + P^T u* + H^T Q u*, alpha u* = -grad L (dense
  Newton); update = eq. 12 with psi* (modulated: sigma'(phi*) * psi* on hidden units)."""
  problem, params, batch = small(shape)
  alpha = 0.5
  solver = lf_solver(alpha=alpha, k_i=2.0, learn_q=False, modulated=modulated)
  q = solver.init(problem, params, jax.random.key(3))
  est = solver(problem, params, q, batch, jax.random.key(0))
  assert bool(jnp.all(est.stats["controlled/converged"]))
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(est.solver_grads)[0]), 0.0)

  W, U, b, hidden, y = dense(shape, params)
  n = W.shape[0]
  Q = jnp.zeros((n, N_OUT)).at[hidden].set(jnp.concatenate(q, 0))
  P = jnp.zeros((n, N_OUT)).at[y, np.arange(N_OUT)].set(1.0)
  def g(z, x, label):
    phi, u = z[:n], z[n:]
    return jnp.concatenate([-phi + W @ jnp.tanh(phi) + U @ x + b + (P + Q) @ u,
                            -ce_grad(phi[y], label, 1.0) - alpha * u])

  z = newton(g, jnp.zeros(n + N_OUT), batch)
  phis, psis = z[:, :n], z[:, n:] @ (P + Q).T
  if modulated:
    psis = psis.at[:, hidden].multiply(1 - jnp.tanh(phis[:, hidden]) ** 2)
  expected = dense_grads(shape, params, psis, phis, batch["x"])
  assert_tree_close(est.grads, expected, rtol=1e-7, atol=1e-10)


def _column_space_gap(problem, params, q, state, example):
  """Fraction of Q (on the outputs' 1-complement) outside col(M^T), with M =
  -[d out / d h] (d_h f)^{-1} the map from a hidden perturbation to the outputs,
  i.e. row([0, Id] (d_phi f)^{-1}) restricted to the hidden units."""
  def f_of(h):
    return problem.f(params, {"hidden": (h,), "out": state["out"]}, example)
  h = state["hidden"][0]
  a_hh = jax.jacobian(lambda v: f_of(v)["hidden"][0])(h)
  a_yh = jax.jacobian(lambda v: f_of(v)["out"])(h)
  m_t = (-a_yh @ jnp.linalg.inv(a_hh)).T
  perp = jnp.eye(N_OUT) - jnp.ones((N_OUT, N_OUT)) / N_OUT  # softmax CE never moves u along 1
  basis = jnp.linalg.svd(m_t @ perp)[0][:, :N_OUT - 1]
  qp = q[0] @ perp
  return float(jnp.linalg.norm(qp - basis @ (basis.T @ qp)) / jnp.linalg.norm(qp))


def test_q_rule_approaches_column_space_condition_on_one_sample():
  """Section 3.1.1: on one sample the Q rule finds feedback weights whose column
  space is row([0, Id] (d_phi f)^{-1}) (hidden part). Applied as plain SGD
  (Q <- Q - solver_grads) on a batch of copies of one example."""
  width, copies = 16, 32
  problem = mnist.make_problem("rnn", width, input_dim=5)
  k = jax.random.split(jax.random.key(0), 3)
  example = {"x": jax.random.normal(k[0], (5,), jnp.float64), "label": jnp.asarray(3)}
  params = problem.init_params(k[1], example)
  params = jax.tree.map(lambda a: 3.0 * a, params)
  batch = jax.tree.map(lambda a: jnp.broadcast_to(a, (copies,) + jnp.shape(a)), example)
  # A strong, fast controller (k_i alpha = 10) gives the rule a clear signal.
  solver = solvers.get_solver("lcp_lf", alpha=1.0, k_i=10.0, sigma=0.1, tau_q=100.0,
                              q_weight_decay=0.01, noise_steps=800,
                              controlled=dict(rtol=1e-10, max_steps=5000))
  q = solver.init(problem, params, k[2])
  # A fresh key per step: the rule averages the noise over steps.
  step = jax.jit(lambda q, key: solver(problem, params, q, batch, key))

  def gap(q):
    z = solver.controlled.solve(solver.field(problem, params, q, example),
                                solver.initial_state(problem, problem.init_state(params, example),
                                                     example))
    return _column_space_gap(problem, params, q, z.value.phi, example)

  gaps = [gap(q)]
  for it in range(240):
    key = jax.random.fold_in(jax.random.key(0), it)
    q = jax.tree.map(lambda a, g: a - g, q, step(q, key).solver_grads)
    if (it + 1) % 80 == 0:
      gaps.append(gap(q))
  # A random 9-dim column space in R^16 is far from the 9-dim target (gap ~ 0.75).
  assert gaps[0] > 0.6, gaps
  assert gaps[-1] < 0.5 * gaps[0], gaps
  assert gaps[-1] < gaps[1], gaps


def test_needs_structure_hooks():
  problem, params, _ = tanh_rnn()
  with pytest.raises(ValueError, match="feedback_units"):
    solvers.get_solver("lcp_lf").init(problem, params, jax.random.key(0))
  problem, params, _ = small("rnn")
  with pytest.raises(ValueError, match="presynaptic"):
    solvers.get_solver("lcp_lf", presynaptic="nope").init(problem, params, jax.random.key(0))


def test_q_scale_stores_q_over_scale_and_keeps_the_sgd_rule():
  """S = Q / q_scale; an SGD step of size 1 on S applies the same dQ for any q_scale."""
  problem, params, batch = small("rnn")
  out = {}
  for scale in (1.0, 0.25):
    solver = solvers.get_solver("lcp_lf", q_scale=scale, noise_steps=40, k_i=2.0)
    s = solver.init(problem, params, jax.random.key(4))
    est = solver(problem, params, s, batch, jax.random.key(0))
    out[scale] = (solver.q_of(s), est.grads, solver.q_of(jax.tree.map(
        lambda a, g: a - g, s, est.solver_grads)))
  for a, b in zip(out[1.0], out[0.25]):
    assert_tree_close(a, b, rtol=1e-9, atol=1e-12)
  assert not np.allclose(out[1.0][0][0], out[1.0][2][0])  # Q did move


def test_feedback_units_of_a_flat_state_is_evaluated_abstractly():
  """Issue 12 item 4: init used to call feedback_units on a ShapeDtypeStruct
  (``TypeError: 'ShapeDtypeStruct' object is not subscriptable``)."""
  problem, params, _ = zoo.feedback_rnn(n=8, n_out=2)
  q = solvers.get_solver("lcp_lf").init(problem, params, jax.random.key(0))
  assert [leaf.shape for leaf in jax.tree.leaves(q)] == [(6, 2)]
