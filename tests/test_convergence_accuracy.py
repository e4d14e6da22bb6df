"""A converged flag bounds the gradient error (issue 12, item 1), in float32.

With the solvers' default relaxations, every example flagged converged must give
* rbp / imaml: the implicit gradient of eq. 5 within 1e-5 (relative);
* lcp_di / lcp_ebd: the exact finite-alpha gradient within 1e-3 -- the gradient
  of ``min_phi 1/2||f||^2 + L / alpha`` (section 2.4, beta = 1 / alpha), which by
  the envelope theorem is ``d_theta 1/2||f(phi_a, theta)||^2`` at the minimiser
  ``phi_a``, found here by a trust-region Newton method in float64.
Errors are per example: ``max |g - g*| / max |g*|``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree

import solvers
import zoo
from bilevel import BilevelProblem


def _f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _per_example(instance, solver_name, **options):
  """(per-example flat gradients [B, P] in float64, per-example stats), in float32."""
  problem, params, batch = instance
  with jax.enable_x64(False):
    solver = solvers.get_solver(solver_name, **options)
    params, batch = _f32(params), _f32(batch)
    solver_params = solver.init(problem, params, jax.random.key(0))

    def one(example):
      est = solver(problem, params, solver_params, jax.tree.map(lambda a: a[None], example),
                   jax.random.key(0))
      return ravel_pytree(est.grads)[0], {k: v[0] for k, v in est.stats.items()}

    grads, stats = jax.jit(jax.vmap(one))(batch)
  return np.asarray(grads, np.float64), {k: np.asarray(v) for k, v in stats.items()}


def _examples(batch):
  return [jax.tree.map(lambda a: a[i], batch) for i in range(jax.tree.leaves(batch)[0].shape[0])]


def _augmented_energy_gradient(problem, params, example, alpha):
  """d/dtheta min_phi [1/2||f||^2 + L/alpha] in float64 (trust-region Newton, polished)."""
  flat0, unravel = ravel_pytree(problem.init_state(params, example))

  def energy(v):
    f = ravel_pytree(problem.f(params, unravel(v), example))[0]
    return 0.5 * jnp.sum(f ** 2) + problem.outer_loss(unravel(v), example) / alpha

  grad, hess = jax.jit(jax.grad(energy)), jax.jit(jax.hessian(energy))
  # trust-exact copes with the non-convex start that plain Newton can leave for
  # another stationary point.
  v = scipy.optimize.minimize(lambda v: float(energy(v)), np.asarray(flat0),
                              jac=lambda v: np.asarray(grad(v)),
                              hess=lambda v: np.asarray(hess(v)), method="trust-exact",
                              options={"gtol": 1e-10}).x
  for _ in range(5):
    v = v - np.linalg.solve(hess(v), grad(v))
  assert np.linalg.norm(grad(v)) < 1e-8 and np.linalg.eigvalsh(hess(v)).min() > 0
  phi = unravel(jnp.asarray(v))
  half_sq = lambda p: 0.5 * jnp.sum(ravel_pytree(problem.f(p, phi, example))[0] ** 2)
  return zoo.flat(jax.grad(half_sq)(params))


def _errors(grads, exact):
  return np.max(np.abs(grads - exact), axis=1) / np.max(np.abs(exact), axis=1)


@functools.lru_cache(maxsize=None)
def _zoo(name):
  return zoo.ZOO[name]()


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_rbp_and_imaml_defaults_converged_means_within_1e_5(name):
  problem, params, batch = _zoo(name)
  exact = np.stack([
      zoo.flat(zoo.exact_implicit_gradient(problem, params, jax.tree.map(lambda a: a[None], ex)))
      for ex in _examples(batch)])
  for solver_name in ("rbp", "imaml") if problem.has_energy else ("rbp",):
    grads, stats = _per_example((problem, params, batch), solver_name)
    converged = stats["free/converged"] & stats["adjoint/converged"]
    errors = _errors(grads, exact)
    assert np.all(errors[converged] < 1e-5), (solver_name, errors, converged)
    # Not vacuous: forward Euler (dt = 1) settles every zoo problem but the
    # quadratic synapse, whose Hessian is too stiff for it (and says so).
    assert np.all(converged) or name == "quadratic_synapse", (solver_name, stats)


def _lcp_check(instance, solver_name, alpha):
  problem, params, batch = instance
  exact = np.stack([_augmented_energy_gradient(problem, params, ex, alpha)
                    for ex in _examples(batch)])
  grads, stats = _per_example(instance, solver_name, alpha=alpha)
  converged = stats["free/converged"] & stats["controlled/converged"]
  errors = _errors(grads, exact)
  assert np.all(errors[converged] < 1e-3), (errors, converged)
  assert np.all(converged), (errors, converged)  # not vacuous


@pytest.mark.parametrize("name,alpha", [
    ("tanh_rnn", 1e-3), ("layered_net", 1e-3), ("logistic_synapse", 1e-2)])
@pytest.mark.parametrize("solver_name", ["lcp_di", "lcp_ebd"])
def test_lcp_defaults_converged_means_within_1e_3(name, alpha, solver_name):
  # Measured worst errors: <= 6e-6 (tanh_rnn, layered_net at 1e-3), 5e-5
  # (logistic_synapse at 1e-2). The logistic synapse at alpha = 1e-3 reaches
  # 6.5e-4: the controlled equilibrium is ill-conditioned like 1 / alpha, so
  # the error grows like rtol / alpha -- too close to 1e-3 for a test.
  _lcp_check(_zoo(name), solver_name, alpha)


def softplus_ce_net(n=12, n_in=4, n_classes=3, readout=0.01, batch=8, seed=0):
  """The issue's case: a 12-unit equilibrium net (eq. 11, softplus) with a
  cross-entropy on weakly read-out logits ``y = readout * phi[-3:]``. At alpha =
  1e-3 the controller state u is ~1/readout larger than phi and psi."""
  k = jax.random.split(jax.random.key(seed), 4)
  k1, k2 = jax.random.split(k[2])
  w = jax.random.normal(k1, (n, n))
  params = {"W": 0.6 * w / jnp.linalg.norm(w, 2), "b": jnp.zeros(n),
            "U": jax.random.normal(k2, (n, n_in)) / 2}
  dynamics = lambda p, phi, ex: -phi + p["W"] @ jax.nn.softplus(phi) + p["U"] @ ex["x"] + p["b"]
  loss = lambda y, ex: -jnp.sum(jax.nn.log_softmax(y) * ex["onehot"])
  labels = jax.random.randint(k[1], (batch,), 0, n_classes)
  data = {"x": jax.random.normal(k[0], (batch, n_in)),
          "onehot": jax.nn.one_hot(labels, n_classes)}
  problem = BilevelProblem(
      dynamics=dynamics, loss=loss, output=lambda phi: readout * phi[n - n_classes:],
      init_state=lambda p, ex: jnp.zeros(n, p["W"].dtype), name="softplus_ce",
      example=jax.tree.map(lambda a: a[0], data))
  return problem, params, data


def test_lcp_di_at_small_alpha_with_cross_entropy():
  """Before the per-block rule: errors 0.8-1.8e-3, every example flagged
  converged; now at most 3.5e-4."""
  _lcp_check(softplus_ce_net(), "lcp_di", 1e-3)
