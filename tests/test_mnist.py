"""MNIST equilibrium networks (problems/models/mnist.py; builders in problems/mnist.py),
their configs, and every solver's update on them against an independent dense
computation.

The dense reference writes eq. 11 with explicit matrices -- ``f(phi) = -phi +
W sigma(phi) + U x + b`` over ALL units (hidden layers then outputs), with the
block structure read from the haiku parameters -- and solves each circuit's
steady-state equations by Newton's method in float64; the parameter update
is then the outer products of eq. 12 written by hand.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import problems
import solvers
from launch import config as cfglib
from launch import schema
from problems.models import mnist
from zoo import augmented_energy_value, exact_implicit_gradient

WIDTH, N_OUT, BATCH, N_IN = 6, 10, 3, 5


# ----- a small instance and its dense form ---------------------------------------

def small(shape, *, loss_scale=1.0, seed=0, gain=1.5):
  """(problem, params, batch): width-6 network, random 5-d inputs, float64."""
  problem = mnist.make_problem(shape, WIDTH, loss_scale=loss_scale, input_dim=N_IN)
  k = jax.random.split(jax.random.key(seed), 3)
  batch = {"x": jax.random.normal(k[0], (BATCH, N_IN), jnp.float64),
           "label": jax.random.randint(k[1], (BATCH,), 0, N_OUT)}
  params = problem.init_params(k[2], jax.tree.map(lambda a: a[0], batch))
  # Stronger weights than at initialisation, so the nets are not nearly linear.
  params = jax.tree.map(lambda a: gain * a, params)
  return problem, params, batch


def dense(shape, params):
  """(W [n, n], U [n, N_IN], b [n], hidden index, output index) of eq. 11."""
  p = {k.split("/")[-1]: v for k, v in params.items()}
  w_in, w_out = p["input"], p["readout"]
  if shape == "ff":
    n = 2 * WIDTH + N_OUT
    h1, h2, y = np.arange(WIDTH), WIDTH + np.arange(WIDTH), 2 * WIDTH + np.arange(N_OUT)
    W = jnp.zeros((n, n)).at[np.ix_(h2, h1)].set(p["hidden"]["w"].T)
    W = W.at[np.ix_(y, h2)].set(w_out["w"].T)
    b = jnp.concatenate([w_in["b"], p["hidden"]["b"], w_out["b"]])
    hidden = np.concatenate([h1, h2])
  else:
    n = WIDTH + N_OUT
    h, y = np.arange(WIDTH), WIDTH + np.arange(N_OUT)
    W = jnp.zeros((n, n)).at[np.ix_(h, h)].set(p["recurrent"]["w"].T)
    W = W.at[np.ix_(y, h)].set(w_out["w"].T)
    b = jnp.concatenate([w_in["b"] + p["recurrent"]["b"], w_out["b"]])
    hidden = h
    h1 = h
  U = jnp.zeros((n, N_IN)).at[h1].set(w_in["w"].T)
  return W, U, b, hidden, y


def to_flat(state):
  return jnp.concatenate(list(state["hidden"]) + [state["out"]])


def dense_grads(shape, params, psis, phis, xs):
  """Eq. 12 by hand: the descent direction -(1/B) sum_i [psi sigma(phi)^T, psi x^T, psi]
  mapped back onto the haiku blocks."""
  W, U, b, hidden, y = dense(shape, params)
  gW = -jnp.mean(jnp.einsum("bi,bj->bij", psis, jnp.tanh(phis)), 0)
  gU = -jnp.mean(jnp.einsum("bi,bj->bij", psis, xs), 0)
  gb = -jnp.mean(psis, 0)
  pre = f"mnist_{shape}/"
  if shape == "ff":
    h1, h2 = hidden[:WIDTH], hidden[WIDTH:]
    return {pre + "input": {"w": gU[h1].T, "b": gb[h1]},
            pre + "hidden": {"w": gW[np.ix_(h2, h1)].T, "b": gb[h2]},
            pre + "readout": {"w": gW[np.ix_(y, h2)].T, "b": gb[y]}}
  return {pre + "input": {"w": gU[hidden].T, "b": gb[hidden]},
          pre + "recurrent": {"w": gW[np.ix_(hidden, hidden)].T, "b": gb[hidden]},
          pre + "readout": {"w": gW[np.ix_(y, hidden)].T, "b": gb[y]}}


def newton(g, z0, batch, iters=60):
  """Solves g(z, x, label) = 0 for every example of ``batch`` (Newton, float64, jitted)."""
  def step(z, x, label):
    return z - jnp.linalg.solve(jax.jacobian(g)(z, x, label), g(z, x, label))
  step = jax.jit(jax.vmap(step))
  z = jnp.broadcast_to(z0, (batch["label"].shape[0],) + z0.shape)
  for _ in range(iters):
    z, previous = step(z, batch["x"], batch["label"]), z
    if float(jnp.max(jnp.abs(z - previous))) < 1e-13:
      break
  assert float(jnp.max(jnp.abs(jax.vmap(g)(z, batch["x"], batch["label"])))) < 1e-10
  return z


def ce_grad(yv, label, scale):
  return scale * (jax.nn.softmax(yv) - jax.nn.one_hot(label, N_OUT))


def assert_tree_close(a, b, rtol, atol=1e-12):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def tight(name, **options):
  """A solver with tight tolerances (float64) and otherwise the config's options."""
  rel = dict(rtol=1e-11, max_steps=20000)
  extra = {"free": rel} if name != "bp" else {}
  if name.startswith("lcp"):
    extra["controlled"] = dict(rel, **options.pop("controlled", {}))
  if name == "rbp":
    extra["adjoint"] = dict(rtol=1e-11, max_steps=20000)
  return solvers.get_solver(name, **{**extra, **options})


# ----- the problem -----------------------------------------------------------------

@pytest.mark.parametrize("shape", ["ff", "rnn"])
def test_dynamics_is_eq11_with_dense_matrices(shape):
  problem, params, batch = small(shape)
  W, U, b, _, _ = dense(shape, params)
  ex = jax.tree.map(lambda a: a[0], batch)
  state = jax.tree.map(lambda s: jax.random.normal(jax.random.key(3), s.shape, s.dtype),
                       problem.init_state(params, ex))
  phi = to_flat(state)
  expected = -phi + W @ jnp.tanh(phi) + U @ ex["x"] + b
  np.testing.assert_allclose(to_flat(problem.f(params, state, ex)), expected, rtol=1e-12)


def test_ff_three_euler_steps_are_the_forward_pass():
  problem, params, batch = small("ff")
  p = {k.split("/")[-1]: v for k, v in params.items()}
  res = solvers.get_solver("bp", num_steps=3).free_equilibrium(problem, params, batch)
  h1 = batch["x"] @ p["input"]["w"] + p["input"]["b"]
  h2 = jnp.tanh(h1) @ p["hidden"]["w"] + p["hidden"]["b"]
  logits = jnp.tanh(h2) @ p["readout"]["w"] + p["readout"]["b"]
  np.testing.assert_allclose(res.value["out"], logits, rtol=1e-10)
  assert int(res.iterations.max()) <= 4


def test_init_is_pytorch_default_and_metrics():
  problem = mnist.make_problem("rnn", 64)
  params = problem.init_params(jax.random.key(0), problem.example)
  for name, leaf in params.items():
    fan_in = {"input": 784, "recurrent": 64, "readout": 64}[name.split("/")[-1]]
    for a in leaf.values():
      assert float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(fan_in)
      assert float(jnp.std(a)) > 0.8 / np.sqrt(3 * fan_in)  # uniform, not tiny
  logits = jnp.array([0.0, 2.0] + [0.0] * 8)
  m = problem.metrics(logits, {"label": 1})
  assert float(m["accuracy"]) == 1.0
  np.testing.assert_allclose(m["cross_entropy"], -jax.nn.log_softmax(logits)[1], rtol=1e-6)
  scaled = mnist.make_problem("rnn", 64, loss_scale=1 / 64)
  np.testing.assert_allclose(scaled.loss(logits, {"label": 1}), m["cross_entropy"] / 64,
                             rtol=1e-6)


# ----- every solver's update against an independent computation ---------------------

@pytest.mark.parametrize("shape,solver", [("ff", "bp"), ("ff", "rbp"), ("rnn", "rbp")])
def test_bp_rbp_equal_exact_implicit_gradient(shape, solver):
  problem, params, batch = small(shape)
  options = {"num_steps": 3} if solver == "bp" else {}
  est = tight(solver, **options)(problem, params, (), batch, jax.random.key(0))
  assert_tree_close(est.grads, exact_implicit_gradient(problem, params, batch), rtol=1e-7)


def augmented_energy_grad(problem, params, batch, alpha):
  """theta-gradient of min_phi 1/2||f||^2 + L/alpha (envelope theorem at the Newton
  minimiser): what DI and EBD compute at a finite alpha."""
  def one(ex):
    _, phi = augmented_energy_value(problem, params, ex, alpha)
    return jax.grad(lambda p: 0.5 * sum(jnp.sum(v ** 2) for v in jax.tree.leaves(
        problem.f(p, phi, ex))))(params)
  grads = [one(jax.tree.map(lambda a: a[i], batch)) for i in range(BATCH)]
  return jax.tree.map(lambda *g: sum(g) / BATCH, *grads)


@pytest.mark.parametrize("shape", ["ff", "rnn"])
@pytest.mark.parametrize("solver,options", [
    ("lcp_di", dict(alpha=0.5, k_i=2.0)),
    ("lcp_ebd", dict(alpha=0.5, k_i=2.0, controlled=dict(
        strategy="anderson", strategy_options=dict(dt=0.5, memory=10)))),
])
def test_di_ebd_equal_augmented_energy_gradient(shape, solver, options):
  problem, params, batch = small(shape)
  est = tight(solver, **options)(problem, params, (), batch, jax.random.key(0))
  assert bool(jnp.all(est.stats["controlled/converged"]))
  expected = augmented_energy_grad(problem, params, batch, alpha=0.5)
  assert_tree_close(est.grads, expected, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("shape", ["ff", "rnn"])
def test_kolen_pollack_is_eq14_with_learned_feedback(shape):
  """lcp_kp: steady state of eq. 14 with S = B_W^T (dense Newton), the eq. 12
  update for W, U, b and the transposed Kolen-Pollack update for B, plus decay."""
  problem, params, batch = small(shape)
  alpha, wd = 0.5, 1e-3
  solver = tight("lcp_kp", alpha=alpha, k_i=2.0, weight_decay=wd, feedback_init="random",
                 init_scale=1.0)
  feedback = solver.init(problem, params, jax.random.key(7))
  est = solver(problem, params, feedback, batch, jax.random.key(0))

  W, U, b, _, y = dense(shape, params)
  S = dense(shape, feedback)[0].T  # the backward pathway: psi' = -psi + sigma'(phi) S psi + P^T u
  n = W.shape[0]
  def g(z, x, label):
    phi, psi, u = z[:n], z[n:2 * n], z[2 * n:]
    return jnp.concatenate([
        -phi + W @ jnp.tanh(phi) + U @ x + b + psi,
        -psi + (1 - jnp.tanh(phi) ** 2) * (S @ psi) + jnp.zeros(n).at[y].set(u),
        -ce_grad(phi[y], label, 1.0) - alpha * u])

  z = newton(g, jnp.zeros(2 * n + N_OUT), batch)
  phis, psis = z[:, :n], z[:, n:2 * n]
  update = dense_grads(shape, params, psis, phis, batch["x"])
  assert_tree_close(est.grads, jax.tree.map(lambda g, p: g + wd * p, update, params),
                    rtol=1e-7, atol=1e-10)
  # dS = sigma(phi*) psi*^T - gamma S: B gets the forward update plus its own decay.
  assert_tree_close(est.solver_grads, jax.tree.map(lambda g, s: g + wd * s, update, feedback),
                    rtol=1e-7, atol=1e-10)


def test_kolen_pollack_copy_init_equals_di():
  problem, params, batch = small("rnn")
  kp = tight("lcp_kp", alpha=0.5, k_i=2.0, weight_decay=0.0, feedback_init="copy")
  di = tight("lcp_di", alpha=0.5, k_i=2.0)
  key = jax.random.key(0)
  est = kp(problem, params, kp.init(problem, params, key), batch, key)
  assert_tree_close(est.grads, di(problem, params, (), batch, key).grads, rtol=1e-8,
                    atol=1e-12)


# ----- Task and configs ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["mnist_ff", "mnist_rnn"])
def test_configs_build_every_solver_and_presets(name):
  for preset in (None, "fast", "quick"):
    config = cfglib.load(f"{name}:{preset}" if preset else name)
    assert config.problem == name and config.batch_size == 64
    for solver in ("bp", "rbp", "lcp_di", "lcp_kp", "lcp_ebd", "lcp_lf"):
      config.solver = solver
      cfglib.build_solver(config)
  default = cfglib.load(name)
  assert default.num_epochs == 30 and default.solvers.lcp_di.alpha == 0.1
  assert default.solvers.lcp_di.controlled.max_steps == 800
  assert default.solvers.lcp_di.controlled.rtol == 1e-6
  assert cfglib.load(f"{name}:quick").num_epochs == 1
  cfg = cfglib.load(name, [("solver", "lcp_kp"), ("solvers.lcp_kp.weight_decay", "1e-5"),
                           ("solvers.lcp_kp.controlled.strategy", "anderson")])
  solver = cfglib.build_solver(cfg)
  assert solver.weight_decay == 1e-5 and type(solver.controlled.strategy).__name__ == "Anderson"
  with pytest.raises(cfglib.ConfigError, match="valid presets"):
    cfglib.load(f"{name}:nope")


def test_task_data_and_evaluation():
  config = cfglib.load("mnist_ff:quick", [("problem_options.width", "8"),
                                          ("problem_options.eval_train_examples", "1000")])
  task = problems.make_task(config)
  assert task.steps_per_epoch == 60000 // 64
  batch = task.train_batch(5)
  assert batch["x"].shape == (64, 784) and batch["label"].shape == (64,)
  np.testing.assert_array_equal(task.train_batch(5)["label"], batch["label"])
  assert abs(float(np.mean(task.train_batch(0)["x"]))) < 0.2  # normalised
  solver = cfglib.build_solver(config)
  params = task.problem.init_params(jax.random.key(0), task.example)
  out = task.evaluate(params, solver)
  assert set(out) >= {"test/accuracy", "test/cross_entropy", "train/accuracy"}
  assert 0.0 <= out["test/accuracy"] <= 1.0 and out["test/free/converged_fraction"] == 1.0
  config = cfglib.load("mnist_rnn")
  with config.problem_options.unlocked():
    config.problem_options.hidden = 3
  with pytest.raises(ValueError, match="unknown problem_options"):
    problems.make_task(config)


@pytest.mark.parametrize("net", ["ff", "rnn"])
def test_mnist_presets_state_the_authors_problem(net):
  paper, authors, normalized = (cfglib.load(f"mnist_{net}:{p}")
                                for p in ("paper", "authors", "paper_normalized"))
  for c in (paper, authors):
    schema.validate(c)
    assert c.problem_options.normalize is False
    assert c.optimizer.get("clip_groups", "joint") == ("separate" if net == "rnn" else "joint")
    assert c.solvers.lcp_di.free.rtol == 1e-6 and c.solvers.lcp_di.controlled.rtol == 1e-6
  assert normalized.problem_options.normalize is True
  assert schema.to_dict(normalized) == schema.to_dict(cfglib.load(f"mnist_{net}"))
  ebd = solvers.get_solver("lcp_ebd", **schema.to_dict(paper.solvers.lcp_ebd))
  assert ebd.dynamics == "dynamic_inversion" and ebd.controlled.rtol == 1e-6
  di = solvers.get_solver("lcp_di", **schema.to_dict(authors.solvers.lcp_di))
  assert di.controlled_start == "zeros" and di.k_i == 1.0
  kp = solvers.get_solver("lcp_kp", **schema.to_dict(authors.solvers.lcp_kp))
  assert kp.feedback_init == "unit_norm"
  ebd = solvers.get_solver("lcp_ebd", **schema.to_dict(authors.solvers.lcp_ebd))
  assert ebd.controlled.rtol == 0.0  # a fixed number of Adam steps, as theirs
  assert ebd.controlled_start == ("free" if net == "rnn" else "zeros")
