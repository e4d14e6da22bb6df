"""Equilibria of the Omniglot complex-synapse problem and the LCP meta-update (eqs. 16-18).

* The smooth conv-4 (``net="smooth"``) has a differentiable inner energy and
  keeps the parameter tree of the paper's max-pool net.
* On a small smooth meta problem in float64 the strong-control ``lcp`` update
  (eq. 18, ``d omega = lambda u*``) equals ``-grad_omega H`` with ``H = 1/2
  ||psi*||^2`` the least-control objective (eq. 3), computed independently: in
  closed form, and by central finite differences of H.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import solvers
from bilevel.problem import BilevelProblem
from configs import omniglot as omniglot_config
from problems import convnet

LAM = 0.5
DIM = 6


def _quadratic_meta_problem():
  """Eq. 16 with ``L_learn = 1/2 (phi-a)^T K (phi-a)`` and a strongly convex
  ``L_eval = 1/2 (phi-b)^T M (phi-b)`` (one task): ``grad L_eval = 0`` has the
  single solution ``b``, so the least-control state is ``phi = b`` for every
  omega and ``H(omega) = 1/2 ||K (b-a) + lambda (b-omega)||^2`` (eq. 3, ``psi =
  -f(b)``)."""
  keys = jax.random.split(jax.random.key(0), 5)
  ak = jax.random.normal(keys[0], (DIM, DIM)) / np.sqrt(DIM)
  am = jax.random.normal(keys[1], (DIM, DIM)) / np.sqrt(DIM)
  task = {"K": ak @ ak.T, "M": am @ am.T + jnp.eye(DIM),
          "a": jax.random.normal(keys[2], (DIM,)), "b": jax.random.normal(keys[3], (DIM,))}
  omega = jax.random.normal(keys[4], (DIM,))

  def energy(params, phi, t):
    d = phi - t["a"]
    return 0.5 * d @ t["K"] @ d + 0.5 * LAM * jnp.sum((phi - params) ** 2)

  def loss(phi, t):
    d = phi - t["b"]
    return 0.5 * d @ t["M"] @ d

  problem = BilevelProblem(energy=energy, loss=loss, init_state=lambda p, t: p)
  return problem, omega, task


def _least_control_objective(omega, task):
  """H(omega) of eq. 3 with phi* = b (the only state with grad L_eval = 0)."""
  psi = task["K"] @ (task["b"] - task["a"]) + LAM * (task["b"] - omega)
  return 0.5 * psi @ psi


def _strong_lcp(alpha: float):
  """The default strong-control lcp of configs/omniglot.py (gains), with ``alpha`` (the
  strength) as given, solved float64-tight by Anderson on the joint (phi, u) dynamics:
  the default's ``reduced`` heavy-ball route reaches the same steady state
  (tests/test_controlled_solve.py) but at alpha = 1e-7 needs ~1e5 steps."""
  opts = dict(omniglot_config.get_config("test").solvers.lcp)
  assert opts["controlled_solve"] == "reduced"
  controlled = dict(strategy="anderson", strategy_options=dict(dt=0.05, memory=5),
                    rtol=1e-13, max_steps=20000)
  free = dict(strategy="anderson", strategy_options=dict(dt=0.5, memory=5), rtol=1e-13,
              max_steps=5000)
  return solvers.get_solver("lcp", free=free, alpha=alpha, k_i=opts["k_i"],
                            k_p=opts["k_p"], controlled=controlled)


def _lcp_update(solver, problem, omega, task):
  batch = jax.tree.map(lambda x: x[None], task)
  # One-line edit when solvers take a PRNG key: solver(problem, omega, (), batch, key).
  est = jax.jit(lambda p, b: solver(problem, p, (), b, jax.random.key(0)))(omega, batch)
  return est


def test_strong_control_lcp_update_is_minus_grad_least_control_objective():
  problem, omega, task = _quadratic_meta_problem()
  solver = _strong_lcp(alpha=1e-7)
  est = _lcp_update(solver, problem, omega, task)
  assert bool(est.stats["controlled/converged"][0]), est.stats["controlled/relative_residual"]
  # GradientEstimate.grads is the direction to descend: grad_omega H = -lambda u*.
  closed = jax.grad(_least_control_objective)(omega, task)
  h = 1e-5
  eye = np.eye(DIM)
  fd = np.array([(_least_control_objective(omega + h * e, task)
                  - _least_control_objective(omega - h * e, task)) / (2 * h) for e in eye])
  np.testing.assert_allclose(closed, fd, rtol=1e-7, atol=1e-9)
  rel = float(jnp.linalg.norm(est.grads - fd) / jnp.linalg.norm(fd))
  assert rel < 1e-4, rel


def test_weak_control_is_not_the_least_control_update():
  """alpha = 10 (``+weak_lcp``) gives ~ FOMAML / alpha, far from -grad H: the two
  regimes really differ, so the default matters."""
  problem, omega, task = _quadratic_meta_problem()
  weak = dict(omniglot_config.get_config("test+weak_lcp").solvers.lcp)
  solver = solvers.get_solver(
      "lcp", free=dict(strategy="anderson", rtol=1e-13, max_steps=5000), alpha=weak["alpha"],
      k_i=weak["k_i"], controlled=dict(strategy="anderson", rtol=1e-13, max_steps=20000))
  est = _lcp_update(solver, problem, omega, task)
  target = jax.grad(_least_control_objective)(omega, task)
  rel = float(jnp.linalg.norm(est.grads - target) / jnp.linalg.norm(target))
  assert rel > 0.5, rel


def test_default_lcp_is_strong_control_and_weak_is_a_preset_token():
  strong = omniglot_config.get_config(None).solvers.lcp
  weak = omniglot_config.get_config("weak_lcp").solvers.lcp
  assert strong.alpha <= 0.1 < 10.0 == weak.alpha
  assert omniglot_config.get_config("quick+smooth").problem_options.net == "smooth"
  with pytest.raises(ValueError, match="unknown preset"):
    omniglot_config.get_config("quick+cpu")


def test_smooth_net_keeps_the_parameter_tree_and_is_differentiable():
  x = jax.random.uniform(jax.random.key(1), (6, 28, 28, 1))
  nets = {n: convnet.make_convnet(5, channels=4, blocks=4, net=n) for n in convnet.NETS}
  params = nets["maxpool"].init(jax.random.key(2), x)
  assert jax.tree.structure(nets["smooth"].init(jax.random.key(2), x)) == \
      jax.tree.structure(params)
  flat, unravel = ravel_pytree(params)
  g = jax.random.normal(jax.random.key(3), (6, 5))
  loss = lambda v: jnp.vdot(nets["smooth"].apply(unravel(v), x), g)
  d = jax.random.normal(jax.random.key(4), flat.shape)
  # Directional derivative = central difference (smooth everywhere, no kinks).
  h = 1e-5
  fd = (loss(flat + h * d) - loss(flat - h * d)) / (2 * h)
  np.testing.assert_allclose(jnp.vdot(jax.grad(loss)(flat), d), fd, rtol=1e-6)
  with pytest.raises(ValueError, match="net must be one of"):
    convnet.make_convnet(5, net="relu")


def test_smooth_net_phases_restart_and_the_max_pool_net_keeps_the_recipe():
  """Every phase on the smooth net descends a smooth energy with adaptive restart (it
  keeps converging at meta-trained omegas, docs/omniglot.md section 2); the max-pool
  net keeps the CML recipe's Nesterov SGD, whose trajectory BP and FOMAML read."""
  for preset, rule in (("cpu+smooth", "restarting_nesterov"), ("cpu", "sgd")):
    s = omniglot_config.get_config(preset).solvers
    phases = [s.lcp.free, s.lcp.controlled, s.cml.nudged, s.rbp.adjoint, s.bp.free]
    assert [p.strategy for p in phases] == [rule] * len(phases), preset
    assert s.lcp.free.strategy_options.learning_rate == 0.01  # the protocol's
