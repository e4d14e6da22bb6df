"""Every solver's gradient against an independent exact answer on the zoo.

* bp, rbp (all adjoint methods) and imaml: the implicit-function-theorem
  gradient of eq. 5 from dense Jacobians and a dense inverse.
* lcp_di, lcp_ebd, lcp_kp: at a finite alpha the controlled equilibrium is the
  minimiser of F = 1/2||f||^2 + L/alpha (section 2.4, beta = 1/alpha), so the
  update must equal grad_theta min_phi F -- checked by central finite
  differences of min F computed by Newton's method. As alpha -> 0 the update
  tends to grad H (Theorem 1) and grad_y L -> 0 at the controlled state (eq. 3).
* lcp_direct: agrees with lcp_di / lcp_ebd when all of phi is output.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solvers
import zoo


@functools.lru_cache(maxsize=None)
def _zoo(name):
  return zoo.ZOO[name]()


@functools.lru_cache(maxsize=None)
def _exact(name):
  problem, params, batch = _zoo(name)
  return zoo.flat(zoo.exact_implicit_gradient(problem, params, batch))


def _estimate(name, solver_name, **options):
  return zoo.solver_estimate(_zoo(name), solver_name, **options)


IMPLICIT_CASES = [
    ("rbp", {"adjoint": {"rtol": 1e-12, "max_steps": 5000,
                         "strategy": "euler", "strategy_options": {"dt": 0.3}}}),
    ("rbp", {"adjoint": {"rtol": 1e-12, "max_steps": 5000, "strategy": "anderson",
                         "strategy_options": {"dt": 0.3}}}),
    ("rbp", {"adjoint_method": "neumann",
             "adjoint": {"max_steps": 400, "strategy": "euler",
                         "strategy_options": {"dt": 0.3}}}),
    ("bp", {"num_steps": 400, "free": {"strategy": "euler", "strategy_options": {"dt": 0.3}}}),
    ("bp", {"num_steps": 400, "remat": True,
            "free": {"strategy": "euler", "strategy_options": {"dt": 0.3}}}),
]
ENERGY_CASES = [
    ("imaml", {"adjoint": {"rtol": 1e-13, "max_steps": 200}}),
    ("rbp", {"adjoint_method": "cg", "adjoint": {"rtol": 1e-13, "max_steps": 200}}),
]


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
@pytest.mark.parametrize("solver_name,options", IMPLICIT_CASES + ENERGY_CASES,
                         ids=lambda x: x if isinstance(x, str) else "")
def test_implicit_solvers_match_dense_inverse(name, solver_name, options):
  problem, _, _ = _zoo(name)
  if (solver_name, options) in ENERGY_CASES and not problem.has_energy:
    with pytest.raises(ValueError, match="energy"):
      _estimate(name, solver_name, **options)
    return
  options = {"free": zoo.TIGHT_FREE, **options}
  est = _estimate(name, solver_name, **options)
  err = zoo.rel_err(zoo.flat(est.grads), _exact(name))
  assert err < 1e-7, f"{solver_name} on {name}: max relative error {err:.2e}"
  assert bool(jnp.all(est.stats["free/converged"]))


def _augmented_energy_gradient(name, alpha, directions):
  return zoo.augmented_energy_fd_gradient(_zoo(name), alpha, directions)


LCP_PROBLEMS = ["tanh_rnn", "layered_net", "quadratic_synapse", "logistic_synapse"]


@pytest.mark.parametrize("name", LCP_PROBLEMS)
@pytest.mark.parametrize("solver_name", ["lcp_di", "lcp_ebd"])
def test_lcp_update_is_gradient_of_augmented_energy(name, solver_name):
  alpha = 0.05
  est = _estimate(name, solver_name, alpha=alpha, free=zoo.TIGHT_FREE,
                  controlled=zoo.TIGHT_CONTROLLED)
  assert bool(jnp.all(est.stats["controlled/converged"]))
  update = zoo.flat(est.grads)
  rng = np.random.default_rng(0)
  directions = [update / np.linalg.norm(update)] + [
      rng.standard_normal(update.shape) for _ in range(2)]
  fd = _augmented_energy_gradient(name, alpha, directions)
  np.testing.assert_allclose([d @ update for d in directions], fd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", LCP_PROBLEMS)
def test_di_and_ebd_reach_the_same_optimal_control(name):
  di = _estimate(name, "lcp_di", alpha=0.05, free=zoo.TIGHT_FREE, controlled=zoo.TIGHT_CONTROLLED)
  ebd = _estimate(name, "lcp_ebd", alpha=0.05, free=zoo.TIGHT_FREE, controlled=zoo.TIGHT_CONTROLLED)
  np.testing.assert_allclose(zoo.flat(di.grads), zoo.flat(ebd.grads), rtol=1e-7, atol=1e-10)
  np.testing.assert_allclose(di.stats["psi_norm"], ebd.stats["psi_norm"], rtol=1e-8)
  # f(phi*) + psi* = 0 at the controlled equilibrium (eq. 3).
  assert float(jnp.max(di.stats["constraint_violation"])) < 1e-9


@pytest.mark.parametrize("name", ["tanh_rnn", "quadratic_synapse"])
def test_alpha_to_zero_recovers_the_least_control_gradient(name):
  """grad_y L -> 0 at the controlled state and the update -> grad H (eq. 4)."""
  problem, params, batch = _zoo(name)
  update_dir = None
  errors, losses = [], []
  for alpha in (1e-2, 1e-3):
    est = _estimate(name, "lcp_di", alpha=alpha, free=zoo.TIGHT_FREE,
                    controlled=zoo.TIGHT_CONTROLLED)
    assert bool(jnp.all(est.stats["controlled/converged"]))
    update = zoo.flat(est.grads)
    update_dir = update / np.linalg.norm(update) if update_dir is None else update_dir
    # H's gradient: the augmented energy in the perfect-control limit alpha -> 0
    # (penalty method, Newton in float64), along the update direction.
    exact = _augmented_energy_gradient(name, 1e-9, [update_dir])[0]
    errors.append(abs(update_dir @ update - exact) / abs(exact))
    losses.append(float(jnp.max(est.stats["controlled_loss"])))
  assert errors[1] < errors[0] / 5 and errors[1] < 0.02, errors
  assert losses[1] < losses[0], losses


def test_direct_control_matches_dynamic_inversion_when_all_state_is_output():
  errors = []
  for alpha in (1e-2, 1e-3):
    di = _estimate("quadratic_synapse", "lcp_di", alpha=alpha, free=zoo.TIGHT_FREE,
                   controlled=zoo.TIGHT_CONTROLLED)
    direct = _estimate("quadratic_synapse", "lcp_direct", alpha=alpha, free=zoo.TIGHT_FREE,
                       controlled=zoo.TIGHT_CONTROLLED)
    assert bool(jnp.all(direct.stats["controlled/converged"]))
    errors.append(zoo.rel_err(zoo.flat(direct.grads), zoo.flat(di.grads)))
  assert errors[1] < errors[0] / 5 and errors[1] < 0.01, errors


def test_meta_learning_rule_is_lambda_u_in_closed_form():
  """Eq. 18 on the quadratic synapse, solved by hand: the direct-control steady
  state solves grad E(phi) + grad L(phi) / alpha = 0 (a linear system here), the
  controller is u* = grad E(phi*), and the update is d omega = lambda u*."""
  alpha, lam = 1e-2, 1.0  # lam as in zoo.complex_synapse
  problem, omega, batch = _zoo("quadratic_synapse")
  est = _estimate("quadratic_synapse", "lcp", alpha=alpha, free=zoo.TIGHT_FREE,
                  controlled=zoo.TIGHT_CONTROLLED)
  expected = []
  for i in range(batch["xs"].shape[0]):
    xs, ys, xq, yq = (np.asarray(batch[k][i]) for k in ("xs", "ys", "xq", "yq"))
    a_s, b_s = xs.T @ xs / len(ys), xs.T @ ys / len(ys)
    a_q, b_q = xq.T @ xq / len(yq), xq.T @ yq / len(yq)
    eye = np.eye(len(omega))
    phi = np.linalg.solve(a_s + lam * eye + a_q / alpha, b_s + lam * omega + b_q / alpha)
    u = a_s @ phi - b_s + lam * (phi - omega)
    expected.append(-lam * u)  # a gradient to descend: d omega = +lambda u*
  np.testing.assert_allclose(est.grads, np.mean(expected, axis=0), rtol=1e-8)


def test_kolen_pollack_copy_equals_dynamic_inversion_and_aligns():
  name = "tanh_rnn"
  di = _estimate(name, "lcp_di", free=zoo.TIGHT_FREE, controlled=zoo.TIGHT_CONTROLLED)
  kp = _estimate(name, "lcp_kp", feedback_init="copy", weight_decay=0.0,
                 free=zoo.TIGHT_FREE, controlled=zoo.TIGHT_CONTROLLED)
  np.testing.assert_allclose(zoo.flat(kp.grads), zoo.flat(di.grads), rtol=1e-9)
  # With random feedback, both pathways get the same local update plus decay, so
  # under SGD the misalignment B - theta shrinks by exactly (1 - lr * gamma).
  problem, params, batch = _zoo(name)
  solver = solvers.get_solver("lcp_kp", weight_decay=0.1, controlled=zoo.TIGHT_CONTROLLED)
  feedback = solver.init(problem, params, jax.random.key(1))
  est = solver(problem, params, feedback, batch, jax.random.key(0))
  lr = 0.5
  new_params = jax.tree.map(lambda p, g: p - lr * g, params, est.grads)
  new_feedback = jax.tree.map(lambda p, g: p - lr * g, feedback, est.solver_grads)
  gap = lambda a, b: zoo.flat(a) - zoo.flat(b)
  np.testing.assert_allclose(gap(new_feedback, new_params),
                             (1 - lr * 0.1) * gap(feedback, params), rtol=1e-10)
  # The random feedback changes the control (no weight transport) ...
  assert not np.allclose(zoo.flat(est.grads), zoo.flat(kp.grads))


def _slow_example_problem():
  """``f = r (tanh(W x) - phi)`` with a per-example rate r; example 2 relaxes 1e4 x slower
  than the others, so neither its free nor its controlled phase settles in the budget."""
  from bilevel.problem import BilevelProblem
  problem = BilevelProblem(
      dynamics=lambda p, phi, ex: ex["rate"] * (jnp.tanh(p["w"] @ ex["x"]) - phi),
      loss=lambda phi, ex: 0.5 * jnp.sum((phi - ex["y"]) ** 2),
      init_state=lambda p, ex: jnp.zeros(3))
  keys = jax.random.split(jax.random.key(3), 3)
  batch = {"x": jax.random.normal(keys[0], (4, 5)), "y": jax.random.normal(keys[1], (4, 3)),
           "rate": jnp.array([1.0, 0.8, 1e-4, 0.9])}
  return problem, {"w": 0.3 * jax.random.normal(keys[2], (3, 5))}, batch


@pytest.mark.parametrize("solver_name,phase", [("rbp", "free"), ("lcp", "controlled")])
def test_quorum_drops_the_examples_it_cuts_off(solver_name, phase):
  """With a quorum on a phase, the batch stops when 3 of 4 examples converged; the
  update is then exactly the one of the 3 converged examples alone. (lcp: weak control,
  u eliminated, so the slow example's controlled rate is r + 1/alpha = 0.0101.)"""
  problem, params, batch = _slow_example_problem()
  euler = {"strategy": "euler", "strategy_options": {"dt": 0.5}, "rtol": 1e-8,
           "max_steps": 3000}
  options = {"free": euler}
  if phase == "controlled":
    options.update(controlled=euler, alpha=100.0, controlled_solve="reduced")
  cut = dict(options, **{phase: dict(euler, quorum=0.75)})
  est = zoo.solver_estimate((problem, params, batch), solver_name, **cut)
  np.testing.assert_array_equal(est.valid, [True, True, False, True])
  assert int(est.stats[f"{phase}/iterations"][2]) < 200  # not run to max_steps
  fast = jax.tree.map(lambda a: a[jnp.array([0, 1, 3])], batch)
  alone = zoo.solver_estimate((problem, params, fast), solver_name, **options)
  np.testing.assert_allclose(zoo.flat(est.grads), zoo.flat(alone.grads), rtol=1e-10,
                             atol=1e-12)


@pytest.mark.parametrize("solver_name,extra", [
    ("rbp", {}), ("lcp_di", {"alpha": 100.0}),
    ("lcp", {"alpha": 100.0, "controlled_solve": "reduced"}),
    ("lcp_di", {"alpha": 100.0, "controlled_solve": {"method": "newton", "fallback": True}})])
def test_compaction_gives_the_uncompacted_update(solver_name, extra):
  """Compacted free and controlled phases (the batch shrinks to the examples still
  running) give the update, statuses and iteration counts of the plain vmapped
  phases, on a batch where one example takes 1e4 x longer than the others."""
  problem, params, batch = _slow_example_problem()
  euler = {"strategy": "euler", "strategy_options": {"dt": 0.5}, "rtol": 1e-8,
           "max_steps": 3000}
  phases = ("free", "adjoint" if solver_name == "rbp" else "controlled")
  plain = zoo.solver_estimate((problem, params, batch), solver_name,
                              **{p: euler for p in phases}, **extra)
  compacted = zoo.solver_estimate((problem, params, batch), solver_name,
                                  **{p: dict(euler, compaction=2) for p in phases}, **extra)
  for key in plain.stats:
    if key.endswith(("/iterations", "/converged")):
      np.testing.assert_array_equal(compacted.stats[key], plain.stats[key], err_msg=key)
  assert int(jnp.max(plain.stats["free/iterations"])) == 3000  # the slow example
  np.testing.assert_array_equal(compacted.valid, plain.valid)
  np.testing.assert_allclose(zoo.flat(compacted.grads), zoo.flat(plain.grads), rtol=1e-10,
                             atol=1e-13)
