"""Meta-learning solvers (cml, fomaml, reptile, t1t2, and lcp / imaml / rbp / bp
on complex synapses) against independent exact answers, in float64.

Problems: the quadratic and logistic synapses of tests/zoo.py (theta = omega),
and a tiny MLP complex synapse with a learned per-synapse lambda (theta =
{"omega", "log_lambda"}) so that the phi <-> omega map and gradients through
lambda are exercised.

* cml -> the implicit gradient (dense inverse, eq. 5) as beta -> 0, O(beta^2)
  symmetric and O(beta) one-sided;
* imaml -> iMAML's formula (I + H/lambda)^{-1} grad L_eval with a dense Hessian,
  and with rbp and bp -> the implicit gradient on the MLP synapse;
* lcp -> at finite alpha its update is lambda f(phi_alpha) = -lambda u*
  (eq. 18, phi_alpha = argmin E + L/alpha by Newton); as alpha -> 0 it tends to
  grad H with H = 1/2 ||f(argmin L, omega)||^2 (Theorem 1);
* fomaml, reptile, t1t2 -> their own closed-form definitions at Newton
  equilibria.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import solvers
import zoo
from bilevel import BilevelProblem


def mlp_synapse(batch=3, n_in=3, hidden=4, n_cls=3, n_support=6, n_query=9, lam=0.7,
                seed=5):
  """A one-hidden-layer tanh MLP classifier as a complex synapse with learned,
  per-synapse lambda: E = CE(support) + 1/2 sum lambda_i (phi_i - omega_i)^2."""
  k = jax.random.split(jax.random.key(seed), 6)

  def net(phi, x):
    return jnp.tanh(x @ phi["w1"] + phi["b1"]) @ phi["w2"] + phi["b2"]

  def ce(phi, x, y):
    logp = jax.nn.log_softmax(net(phi, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

  def energy(theta, phi, task):
    prox = sum(jnp.sum(jnp.exp(l) * (p - o) ** 2) for l, p, o in zip(
        jax.tree.leaves(theta["log_lambda"]), jax.tree.leaves(phi),
        jax.tree.leaves(theta["omega"])))
    return ce(phi, task["xs"], task["ys"]) + 0.5 * prox

  def init_params(key, task):
    k1, k2, k3 = jax.random.split(key, 3)
    omega = {"w1": jax.random.normal(k1, (n_in, hidden)) / np.sqrt(n_in),
             "b1": 0.1 * jax.random.normal(k3, (hidden,)),
             "w2": jax.random.normal(k2, (hidden, n_cls)) / np.sqrt(hidden),
             "b2": jnp.zeros(n_cls)}
    log_lam = jax.tree.map(lambda w: jnp.log(lam) + 0.3 * jnp.sign(w), omega)
    return {"omega": omega, "log_lambda": log_lam}

  data = {"xs": jax.random.normal(k[0], (batch, n_support, n_in)),
          "ys": jax.random.randint(k[1], (batch, n_support), 0, n_cls),
          "xq": jax.random.normal(k[2], (batch, n_query, n_in)),
          "yq": jax.random.randint(k[3], (batch, n_query), 0, n_cls)}
  problem = BilevelProblem(
      energy=energy, loss=lambda phi, t: ce(phi, t["xq"], t["yq"]),
      init_state=lambda theta, task: theta["omega"], init_params=init_params,
      name="mlp_synapse", example=jax.tree.map(lambda a: a[0], data))
  return problem, init_params(k[4], None), data


PROBLEMS = {"quadratic_synapse": zoo.ZOO["quadratic_synapse"],
            "logistic_synapse": zoo.ZOO["logistic_synapse"], "mlp_synapse": mlp_synapse}


@functools.lru_cache(maxsize=None)
def _problem(name):
  return PROBLEMS[name]()


@functools.lru_cache(maxsize=None)
def _exact(name):
  problem, params, batch = _problem(name)
  return zoo.flat(zoo.exact_implicit_gradient(problem, params, batch))


def _estimate(name, solver_name, **options):
  options.setdefault("free", zoo.TIGHT_FREE)
  return zoo.solver_estimate(_problem(name), solver_name, **options)


def _examples(batch):
  size = jax.tree.leaves(batch)[0].shape[0]
  return [jax.tree.map(lambda a: a[i], batch) for i in range(size)]


@functools.lru_cache(maxsize=None)
def _newton_fns(name, rho):
  problem, params, batch = _problem(name)
  _, unravel = ravel_pytree(problem.init_state(params, _examples(batch)[0]))
  obj = lambda v, ex: (problem.energy(params, unravel(v), ex)
                       + rho * problem.outer_loss(unravel(v), ex))

  @jax.jit
  def newton_step(v, ex):
    return jnp.linalg.solve(jax.hessian(obj)(v, ex), jax.grad(obj)(v, ex))

  return newton_step, unravel


def _minimiser(problem, params, example, rho=0.0, name=None):
  """argmin_phi E + rho L by Newton on the flattened fast weights (float64)."""
  name = name or next(k for k in PROBLEMS if _problem(k)[0] is problem)
  newton_step, unravel = _newton_fns(name, float(rho))
  v = ravel_pytree(problem.init_state(params, example))[0]
  for _ in range(100):
    step = newton_step(v, example)
    v = v - step
    if float(jnp.linalg.norm(step)) < 1e-14:
      break
  return unravel(v)


def _omega_embed(name, phi_tree):
  """Put a phi-shaped direction on theta's omega leaves (zeros for lambda)."""
  _, params, _ = _problem(name)
  if name == "mlp_synapse":
    return zoo.flat({"omega": phi_tree, "log_lambda": jax.tree.map(jnp.zeros_like,
                                                                params["log_lambda"])})
  return zoo.flat(phi_tree)


# ----- cml ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _cml_fn(name, symmetric):
  """One compile per problem: beta is traced (it only scales the nudging)."""
  problem, params, batch = _problem(name)

  def estimate(beta):
    solver = solvers.get_solver("cml", beta=beta, symmetric=symmetric, free=zoo.TIGHT_FREE,
                                nudged=zoo.TIGHT_FREE)
    return solver(problem, params, (), batch, jax.random.key(0))

  return jax.jit(estimate)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_cml_tends_to_the_implicit_gradient(name):
  exact = _exact(name)
  sym = [zoo.rel_err(zoo.flat(_cml_fn(name, True)(b).grads), exact) for b in (4e-2, 2e-2)]
  assert 3.0 < sym[0] / sym[1] < 5.0, sym        # O(beta^2)
  est = _cml_fn(name, True)(1e-3)
  assert zoo.rel_err(zoo.flat(est.grads), exact) < 1e-5
  for phase in ("free", "nudged_plus", "nudged_minus"):
    assert bool(jnp.all(est.stats[f"{phase}/converged"]))
  if name == "logistic_synapse":
    one = [zoo.rel_err(zoo.flat(_cml_fn(name, False)(b).grads), exact) for b in (4e-2, 2e-2)]
    assert 1.6 < one[0] / one[1] < 2.4, one      # O(beta)
    assert sym[1] < one[1] / 10, (sym, one)


def test_cml_needs_an_energy():
  with pytest.raises(ValueError, match="energy"):
    problem, params, _ = zoo.ZOO["tanh_rnn"]()
    solvers.get_solver("cml").init(problem, params, jax.random.key(0))


# ----- implicit solvers on the synapses -------------------------------------------------

@pytest.mark.parametrize("name", ["quadratic_synapse", "logistic_synapse"])
def test_imaml_is_imamls_formula(name):
  """(I + H/lambda)^{-1} grad L_eval(phi*), H the dense Hessian of L_learn."""
  problem, omega, batch = _problem(name)
  lam = 1.0  # zoo.complex_synapse's default
  expected = []
  for ex in _examples(batch):
    phi = _minimiser(problem, omega, ex)
    learn = lambda p: problem.energy(omega, p, ex) - 0.5 * lam * jnp.sum((p - omega) ** 2)
    hess = jax.hessian(learn)(phi)
    expected.append(np.linalg.solve(np.eye(len(phi)) + hess / lam,
                                    problem.loss_grad(phi, ex)))
  est = _estimate(name, "imaml", adjoint={"rtol": 1e-13, "max_steps": 200})
  np.testing.assert_allclose(zoo.flat(est.grads), np.mean(expected, axis=0), rtol=1e-9)


@pytest.mark.parametrize("solver_name,options", [
    ("imaml", {"adjoint": {"rtol": 1e-13, "max_steps": 400}}),
    ("rbp", {"adjoint": {"rtol": 1e-13, "max_steps": 5000, "strategy": "anderson",
                         "strategy_options": {"dt": 0.3}}}),
    ("bp", {"num_steps": 600, "free": {"strategy": "euler", "strategy_options": {"dt": 0.3}}}),
], ids=["imaml", "rbp", "bp"])
def test_implicit_gradient_with_learned_lambda(solver_name, options):
  est = _estimate("mlp_synapse", solver_name, **options)
  assert zoo.rel_err(zoo.flat(est.grads), _exact("mlp_synapse")) < 1e-7


# ----- lcp (eqs. 17-18) -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_lcp_update_is_lambda_u_at_finite_alpha(name):
  """Direct control's steady state solves grad E + grad L / alpha = 0; there
  u* = -f(phi_alpha) and the update (a gradient to descend) is
  -d_theta f^T u* -- for theta = omega exactly -lambda u* (d omega = lambda u*)."""
  alpha = 1.0
  problem, params, batch = _problem(name)
  est = _estimate(name, "lcp", alpha=alpha, controlled=zoo.TIGHT_CONTROLLED)
  assert bool(jnp.all(est.stats["controlled/converged"]))
  expected = []
  for ex in _examples(batch):
    phi = _minimiser(problem, params, ex, rho=1.0 / alpha)
    u = jax.tree.map(lambda x: -x, problem.f(params, phi, ex))
    _, vjp = jax.vjp(lambda p: problem.f(p, phi, ex), params)
    expected.append(-zoo.flat(vjp(u)[0]))
    if name != "mlp_synapse":  # theta = omega, lambda = 1: the update is -lambda u*
      np.testing.assert_allclose(expected[-1], -1.0 * zoo.flat(u), rtol=1e-12)
  np.testing.assert_allclose(zoo.flat(est.grads), np.mean(expected, axis=0), rtol=1e-7,
                             atol=1e-12)


def test_lcp_tends_to_grad_h_as_alpha_vanishes():
  """Quadratic synapse (L has a unique minimiser phi_L): H(omega) = 1/2
  ||f(phi_L, omega)||^2, differentiated by jax.grad."""
  problem, omega, batch = _problem("quadratic_synapse")

  def h(w):
    total = 0.0
    for ex in _examples(batch):
      phi_l = jnp.linalg.lstsq(ex["xq"], ex["yq"])[0]
      total = total + 0.5 * jnp.sum(problem.f(w, phi_l, ex) ** 2)
    return total / len(_examples(batch))

  grad_h = np.asarray(jax.grad(h)(omega))
  errors = [zoo.rel_err(zoo.flat(_estimate("quadratic_synapse", "lcp", alpha=a,
                                     controlled=zoo.TIGHT_CONTROLLED).grads), grad_h)
            for a in (1e-2, 1e-3)]
  assert errors[1] < errors[0] / 5 and errors[1] < 1e-2, errors


# ----- first-order heuristics ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_fomaml_is_grad_l_at_the_free_equilibrium(name):
  problem, params, batch = _problem(name)
  g = [problem.loss_grad(_minimiser(problem, params, ex), ex) for ex in _examples(batch)]
  expected = _omega_embed(name, jax.tree.map(lambda *x: jnp.mean(jnp.stack(x), 0), *g))
  np.testing.assert_allclose(zoo.flat(_estimate(name, "fomaml").grads), expected, rtol=1e-8,
                             atol=1e-13)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_reptile_is_omega_minus_adapted_weights(name, rho):
  problem, params, batch = _problem(name)
  step = 0.5
  diffs = [jax.tree.map(lambda o, p: (o - p) / step, problem.init_state(params, ex),
                        _minimiser(problem, params, ex, rho)) for ex in _examples(batch)]
  expected = _omega_embed(name, jax.tree.map(lambda *x: jnp.mean(jnp.stack(x), 0), *diffs))
  est = _estimate(name, "reptile", query_weight=rho, step_size=step)
  np.testing.assert_allclose(zoo.flat(est.grads), expected, rtol=1e-8, atol=1e-13)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_t1t2_is_the_one_step_hypergradient(name):
  """eta d_theta f(phi*)^T grad L(phi*) with dense Jacobians; for theta = omega
  (lambda = 1) that is eta lambda grad L(phi*)."""
  problem, params, batch = _problem(name)
  eta = 0.1
  flat_p, unravel_p = ravel_pytree(params)
  total = np.zeros_like(flat_p)
  for ex in _examples(batch):
    phi = _minimiser(problem, params, ex)
    flat_s, unravel_s = ravel_pytree(phi)
    jac = jax.jacobian(lambda p: ravel_pytree(problem.f(unravel_p(p), phi, ex))[0])(flat_p)
    total += eta * np.asarray(jac).T @ zoo.flat(problem.loss_grad(phi, ex))
    if name != "mlp_synapse":
      np.testing.assert_allclose(np.asarray(jac), np.eye(len(flat_p)), atol=1e-12)
  est = _estimate(name, "t1t2", step_size=eta)
  np.testing.assert_allclose(zoo.flat(est.grads), total / len(_examples(batch)), rtol=1e-8,
                             atol=1e-13)


@pytest.mark.parametrize("solver_name", ["fomaml", "reptile"])
def test_first_order_solvers_need_phi_to_start_at_omega(solver_name):
  problem, params, batch = zoo.ZOO["tanh_rnn"]()  # phi starts at zeros, not at theta
  solver = solvers.get_solver(solver_name)
  with pytest.raises(ValueError, match="fast weights to start at the slow weights"):
    solver.init(problem, params, jax.random.key(0))
  with pytest.raises(ValueError, match="init_state"):
    solver(problem, params, (), batch, jax.random.key(0))
