"""A zoo of small bilevel problems shared by the solver tests, with exact answers.

Every problem is stated through :class:`bilevel.BilevelProblem` exactly as a
user would. ``exact_implicit_gradient`` computes eq. 5 with dense Jacobians
and a dense inverse; ``augmented_energy_value`` computes ``min_phi 1/2||f||^2 +
L/alpha`` by Newton's method -- both independent of every solver.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import solvers
from bilevel import BilevelProblem


def _spectral_scale(w, target):
  return w * (target / jnp.linalg.norm(w, 2))


def tanh_rnn(n: int = 8, n_in: int = 3, n_out: int = 2, *, linear: bool = False,
             batch: int = 4, seed: int = 0):
  """Equilibrium RNN of eq. 11, f = -phi + W sigma(phi) + U x, squared loss on
  the last ``n_out`` units. Returns (problem, params, batch)."""
  sigma = (lambda v: v) if linear else jnp.tanh
  k = jax.random.split(jax.random.key(seed), 4)

  def init_params(key, example):
    k1, k2 = jax.random.split(key)
    w = _spectral_scale(jax.random.normal(k1, (n, n)), 0.6)
    u = jax.random.normal(k2, (n, n_in)) / jnp.sqrt(n_in)
    return {"W": w, "U": u}

  def dynamics(params, phi, ex):
    return -phi + params["W"] @ sigma(phi) + params["U"] @ ex["x"]

  def loss(y, ex):
    return 0.5 * jnp.sum((y - ex["target"]) ** 2)

  data = {"x": jax.random.normal(k[0], (batch, n_in)),
          "target": 0.5 * jax.random.normal(k[1], (batch, n_out))}
  problem = BilevelProblem(
      dynamics=dynamics, loss=loss, output=lambda phi: phi[n - n_out:],
      init_state=lambda params, ex: jnp.zeros(n), init_params=init_params,
      name="linear_net" if linear else "tanh_rnn",
      example=jax.tree.map(lambda a: a[0], data))
  return problem, init_params(k[2], None), data


def layered_net(sizes=(3, 5, 4, 2), batch: int = 4, seed: int = 1):
  """A feedforward net as a block-structured equilibrium (eq. 11 with block W):
  the state is a tuple of layers, h_l = W_l sigma(h_{l-1}) (+ U x for l = 1)."""
  k = jax.random.split(jax.random.key(seed), 3)

  def init_params(key, example):
    keys = jax.random.split(key, len(sizes) - 1)
    return [jax.random.normal(kk, (o, i)) / jnp.sqrt(i)
            for kk, i, o in zip(keys, sizes[:-1], sizes[1:])]

  def dynamics(params, state, ex):
    inputs = (ex["x"],) + tuple(jnp.tanh(h) for h in state[:-1])
    return tuple(-h + w @ a for h, w, a in zip(state, params, inputs))

  def loss(y, ex):
    return 0.5 * jnp.sum((y - ex["target"]) ** 2)

  data = {"x": jax.random.normal(k[0], (batch, sizes[0])),
          "target": 0.5 * jax.random.normal(k[1], (batch, sizes[-1]))}
  problem = BilevelProblem(
      dynamics=dynamics, loss=loss, output=lambda s: s[-1],
      init_state=lambda p, ex: tuple(jnp.zeros(s) for s in sizes[1:]),
      init_params=init_params, name="layered_net",
      example=jax.tree.map(lambda a: a[0], data))
  return problem, init_params(k[2], None), data


def complex_synapse(dim: int = 5, n_support: int = 6, n_query: int = 8, lam: float = 1.0,
                    logistic: bool = False, batch: int = 3, seed: int = 2):
  """Eq. 16 in miniature: fast weights phi minimise L_learn + lam/2 ||phi - omega||^2
  (least squares or logistic regression on the support set); the outer loss is
  the query loss; theta = omega; all of phi is output."""
  k = jax.random.split(jax.random.key(seed), 5)

  def data_loss(phi, x, y):
    z = x @ phi
    if logistic:
      return jnp.mean(jnp.logaddexp(0.0, -y * z))
    return 0.5 * jnp.mean((z - y) ** 2)

  def energy(omega, phi, task):
    return (data_loss(phi, task["xs"], task["ys"])
            + 0.5 * lam * jnp.sum((phi - omega) ** 2))

  def loss(phi, task):
    return data_loss(phi, task["xq"], task["yq"])

  w_true = jax.random.normal(k[0], (batch, dim))
  xs = jax.random.normal(k[1], (batch, n_support, dim))
  xq = jax.random.normal(k[2], (batch, n_query, dim))
  label = (lambda v: jnp.sign(v)) if logistic else (lambda v: v)
  data = {"xs": xs, "ys": label(jnp.einsum("bnd,bd->bn", xs, w_true)),
          "xq": xq, "yq": label(jnp.einsum("bnd,bd->bn", xq, w_true))}
  problem = BilevelProblem(
      energy=energy, loss=loss, init_state=lambda omega, task: omega,
      init_params=lambda key, task: 0.1 * jax.random.normal(key, (dim,)),
      name="logistic_synapse" if logistic else "quadratic_synapse",
      example=jax.tree.map(lambda a: a[0], data))
  return problem, 0.1 * jax.random.normal(k[3], (dim,)), data


ZOO = {
    "tanh_rnn": tanh_rnn,
    "linear_net": functools.partial(tanh_rnn, linear=True),
    "layered_net": layered_net,
    "quadratic_synapse": complex_synapse,
    "logistic_synapse": functools.partial(complex_synapse, logistic=True),
}


def feedback_rnn(n: int = 8, n_out: int = 2, **kwargs):
  """``tanh_rnn`` with the optional hooks of direct linear feedback (eq. 13):
  the state is ONE flat array, ``feedback_units`` slices its hidden part."""
  problem, params, batch = tanh_rnn(n=n, n_out=n_out, **kwargs)
  problem = dataclasses.replace(
      problem, name="feedback_rnn", feedback_units=lambda phi: phi[:n - n_out],
      feedback_modulation=lambda phi: 1.0 - jnp.tanh(phi) ** 2)
  return problem, params, batch


# Every zoo problem, plus the ones that carry optional hooks (solver contract test).
CONTRACT_ZOO = {**ZOO, "feedback_rnn": feedback_rnn}


# ----- independent exact answers ----------------------------------------------

def newton_equilibrium(problem, params, example, tol=1e-13, iters=100):
  """Free equilibrium by Newton's method on the flattened state (float64)."""
  phi0 = problem.init_state(params, example)
  flat0, unravel = ravel_pytree(phi0)
  g = lambda v: ravel_pytree(problem.f(params, unravel(v), example))[0]
  v = flat0
  for _ in range(iters):
    step = jnp.linalg.solve(jax.jacobian(g)(v), g(v))
    v = v - step
    if float(jnp.linalg.norm(step)) < tol:
      break
  return unravel(v)


# Relaxations tight enough that solver errors reflect the method, not the budget.
TIGHT_FREE = {"strategy": "anderson", "strategy_options": {"dt": 0.3}, "rtol": 1e-12,
              "max_steps": 5000}
TIGHT_CONTROLLED = {"strategy": "anderson", "strategy_options": {"dt": 0.2, "memory": 8},
                    "rtol": 1e-12, "max_steps": 20000}


def flat(tree) -> np.ndarray:
  """A pytree as one flat numpy vector."""
  return np.asarray(ravel_pytree(tree)[0])


def rel_err(a, b) -> float:
  """max |a - b| / max |b|."""
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def solver_estimate(instance, solver_name: str, **options):
  """One jitted call of solver ``solver_name`` on ``instance = (problem, params, batch)``."""
  problem, params, batch = instance
  solver = solvers.get_solver(solver_name, **options)
  solver_params = solver.init(problem, params, jax.random.key(0))
  call = lambda p, sp, b: solver(problem, p, sp, b, jax.random.key(0))
  return jax.jit(call)(params, solver_params, batch)


def exact_implicit_gradient(problem, params, batch):
  """Eq. 5 with dense matrices: mean over the batch of
  -d_theta f^T (d_phi f)^{-T} grad_phi L at the Newton equilibrium."""
  flat_p, unravel_p = ravel_pytree(params)
  total = jnp.zeros_like(flat_p)
  size = jax.tree.leaves(batch)[0].shape[0]
  for i in range(size):
    ex = jax.tree.map(lambda a: a[i], batch)
    phi = newton_equilibrium(problem, params, ex)
    flat_s, unravel_s = ravel_pytree(phi)
    f_flat = lambda p, s: ravel_pytree(problem.f(unravel_p(p), unravel_s(s), ex))[0]
    j_state = jax.jacobian(f_flat, argnums=1)(flat_p, flat_s)
    j_params = jax.jacobian(f_flat, argnums=0)(flat_p, flat_s)
    dl = jax.grad(lambda s: problem.outer_loss(unravel_s(s), ex))(flat_s)
    total = total - j_params.T @ np.linalg.solve(j_state.T, dl)
  return unravel_p(total / size)


def augmented_energy_value(problem, params, example, alpha, newton_steps=40):
  """min_phi 1/2 ||f(phi)||^2 + L(phi) / alpha by Newton's method (float64),
  started at the initial state. Returns (value, minimiser).

  Its theta-gradient is what every LCP circuit at a finite alpha computes
  (section 2.4 with beta = 1 / alpha); as alpha -> 0 it tends to grad H.
  """
  return _augmented_energy_solver(problem, alpha, newton_steps)(params, example)


@functools.lru_cache(maxsize=None)
def _augmented_energy_solver(problem, alpha, newton_steps):

  @jax.jit
  def solve(params, example):
    flat0, unravel = ravel_pytree(problem.init_state(params, example))

    def energy(v):
      fv = ravel_pytree(problem.f(params, unravel(v), example))[0]
      return 0.5 * jnp.sum(fv ** 2) + problem.outer_loss(unravel(v), example) / alpha

    def newton(_, v):
      return v - jnp.linalg.solve(jax.hessian(energy)(v), jax.grad(energy)(v))

    v = jax.lax.fori_loop(0, newton_steps, newton, flat0)
    return energy(v), unravel(v)

  return solve


def augmented_energy_fd_gradient(instance, alpha, directions, eps=1e-5):
  """Central differences of (1/B) sum_i min_phi [1/2||f||^2 + L/alpha] along
  ``directions`` (flat parameter vectors); ``instance = (problem, params, batch)``."""
  problem, params, batch = instance
  flat, unravel = ravel_pytree(params)
  size = jax.tree.leaves(batch)[0].shape[0]
  examples = [jax.tree.map(lambda a: a[i], batch) for i in range(size)]

  def value(p):
    return sum(float(augmented_energy_value(problem, p, ex, alpha)[0])
               for ex in examples) / size

  return np.array([(value(unravel(flat + eps * d)) - value(unravel(flat - eps * d)))
                   / (2 * eps) for d in directions])
