"""CIFAR-10 problems (problems/models/cifar.py, problems/layers.py, the builders in
problems/cifar.py): the conv FF net and the DEQ.

Gradients on tiny instances (6x6 / 4x4 images, 2-4 channels, float64) against
independent exact answers from tests/zoo.py:

* bp, rbp: the implicit-function-theorem gradient of eq. 5 (dense Jacobians,
  dense inverse, Newton equilibrium);
* lcp_di, lcp_kp (feedback initialised as a copy): at a finite alpha the update
  is grad_theta min_phi F, F = 1/2||f||^2 + L/alpha (section 2.4); computed
  here by the envelope theorem, grad_theta F(phi*, theta) at the Newton
  minimiser phi* of F, Newton started at zoo.newton_equilibrium's free
  equilibrium (as the controlled relaxation is). Newton needs Hessians
  (forward-over-reverse), so the reference uses ``conv_impl='xla'`` while the
  solvers run the default custom-VJP convolutions; a smooth activation keeps
  Newton well posed.

No test reads CIFAR-10 itself: the data tests write tiny files in the standard
format to a temporary folder.
"""

import functools
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import solvers
import zoo
from bilevel import ProblemError
from problems import layers
from problems.models import cifar

TIGHT_FREE = {"strategy": "anderson", "strategy_options": {"dt": 0.5}, "rtol": 1e-12,
              "max_steps": 5000}
TIGHT_CONTROLLED = {"strategy": "anderson", "strategy_options": {"dt": 0.3, "memory": 8},
                    "rtol": 1e-12, "max_steps": 20000}
TIGHT_ADJOINT = {"rtol": 1e-12, "max_steps": 5000}


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def _rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _f64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _data(shape, batch=3, classes=3, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(k1, (batch,) + shape, jnp.float64),
          "label": jax.random.randint(k2, (batch,), 0, classes)}


def _ff(activation="relu", impl="loop", data=None):
  data = _data((6, 6, 2)) if data is None else data
  ex = jax.tree.map(lambda a: a[0], data)
  return cifar.ff_problem((6, 6, 2), channels=(2, 3), hidden=(4,), num_classes=3,
                          enc_kernel=3, kernel=3, stride=2, padding=1, pool_window=3,
                          pool_stride=2, activation=activation, conv_impl=impl, example=ex)


def _deq(activation="relu", impl="loop", data=None):
  data = _data((4, 4, 2)) if data is None else data
  ex = jax.tree.map(lambda a: a[0], data)
  return cifar.deq_problem((4, 4, 2), channels=4, inner_channels=4, num_classes=3,
                           groups=2, pool=2, block_init_std=0.1, activation=activation,
                           conv_impl=impl, example=ex)


def _params(problem, data, seed=1):
  return _f64(problem.init_params(jax.random.key(seed), jax.tree.map(lambda a: a[0], data)))


# ----------------------------------------------------------------- convolutions

@pytest.mark.parametrize("n,k,s,p", [(15, 5, 2, 1), (7, 5, 2, 1), (6, 3, 1, 1), (8, 3, 2, 1),
                                     (5, 3, 2, 0), (6, 5, 1, 2)])
def test_loop_friendly_conv_vjp_equals_jax(n, k, s, p):
  x = jax.random.normal(jax.random.key(0), (4, n, n, 3), jnp.float64)
  w = jax.random.normal(jax.random.key(1), (k, k, 3, 5), jnp.float64)

  def loss(x, w, impl):
    out = jax.vmap(lambda xi: layers.conv2d(xi, w, s, p, impl))(x)
    return jnp.sum(jnp.sin(out))

  got = jax.grad(loss, argnums=(0, 1))(x, w, "loop")
  want = jax.grad(loss, argnums=(0, 1))(x, w, "xla")
  np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(jax.vmap(lambda xi: layers.conv2d(xi, w, s, p, "loop"))(x),
                                jax.vmap(lambda xi: layers.conv2d(xi, w, s, p, "xla"))(x))


def _kernel_layouts(problem, params, data):
  ex = jax.tree.map(lambda a: a[0], data)
  state = problem.init_state(params, ex)
  fn = jax.jit(lambda s, v: problem.state_vjp(params, s, ex, v))
  text = fn.lower(state, state).as_text()
  return re.findall(r"x\[([0-9a-z, ]+)\]->", text)


@pytest.mark.parametrize("make", [_ff, _deq])
def test_state_vjp_uses_only_hwio_kernels(make):
  """The VJP iterated by rbp/lcp loops has no transposed-layout kernels (those
  run ~70x slower inside while-loops on CPU, see speed_cifar.md)."""
  data = _data((6, 6, 2) if make is _ff else (4, 4, 2))
  fast, slow = make(data=data), make(impl="xla", data=data)
  params = _params(fast, data)
  layouts = _kernel_layouts(fast, params, data)
  assert layouts and all(lay.replace(" ", "") == "0,1,i,o" for lay in layouts), layouts
  assert any(lay.replace(" ", "") != "0,1,i,o"
             for lay in _kernel_layouts(slow, params, data))


# ----------------------------------------------------------------- exact answers (cached)

@functools.lru_cache(maxsize=None)
def _setup(kind, activation="relu"):
  """(problem, params, data) for a tiny instance; same data/params per kind."""
  shape, make = ((6, 6, 2), _ff) if kind == "ff" else ((4, 4, 2), _deq)
  data = _data(shape, batch=2)
  problem = make(activation, data=data)
  return problem, _params(make(data=data), data), data


@functools.lru_cache(maxsize=None)
def _exact_implicit(kind):
  problem, params, data = _setup(kind)
  return _flat(zoo.exact_implicit_gradient(problem, params, data))


ALPHA = 0.5


def _augmented_energy_gradient(problem, params, data, phi0s, steps=40):
  """grad_theta min_phi F (batch mean) by the envelope theorem, F = 1/2||f||^2
  + L/alpha: grad_theta F(phi*, theta) at phi* = argmin F, found by Newton's
  method started at the free equilibrium phi0 -- the basin the controlled
  relaxation starts in (zoo.augmented_energy_value starts at the initial
  state, which for the DEQ lands in another stationary point)."""

  def one(ex, phi0):
    flat0, unravel = ravel_pytree(phi0)

    def energy(v, p):
      fv = ravel_pytree(problem.f(p, unravel(v), ex))[0]
      return 0.5 * jnp.sum(fv ** 2) + problem.outer_loss(unravel(v), ex) / ALPHA

    newton = lambda _, v: v - jnp.linalg.solve(jax.hessian(energy)(v, params),
                                               jax.grad(energy)(v, params))
    v = jax.lax.fori_loop(0, steps, newton, flat0)
    return (ravel_pytree(jax.grad(energy, argnums=1)(v, params))[0],
            jnp.linalg.norm(jax.grad(energy)(v, params)))

  grads, stationarity = jax.jit(jax.vmap(one))(data, phi0s)
  assert float(jnp.max(stationarity)) < 1e-10
  return np.asarray(jnp.mean(grads, axis=0))


@functools.lru_cache(maxsize=None)
def _exact_augmented(kind):
  """The LCP answer at finite alpha (smooth activation; the reference problem
  uses jax's own conv VJP, which Hessians need)."""
  _, params, data = _setup(kind, "softplus")
  ref = (_ff if kind == "ff" else _deq)("softplus", "xla", data=data)
  size = jax.tree.leaves(data)[0].shape[0]
  frees = [zoo.newton_equilibrium(ref, params, jax.tree.map(lambda a: a[i], data))
           for i in range(size)]
  return _augmented_energy_gradient(ref, params, data,
                                    jax.tree.map(lambda *a: jnp.stack(a), *frees))


def _run(solver, problem, params, data, solver_params=()):
  return jax.jit(lambda p, sp, b: solver(problem, p, sp, b, jax.random.key(0)))(params, solver_params, data)


# ----------------------------------------------------------------- the FF net

def test_ff_equilibrium_is_the_forward_pass():
  problem, params, data = _setup("ff")
  ex = jax.tree.map(lambda a: a[0], data)
  free = solvers.get_solver("rbp").free.solve(lambda s: problem.f(params, s, ex),
                                               problem.init_state(params, ex))
  assert bool(free.converged) and int(free.iterations) == 4  # depth: 2 conv + 1 dense + out
  # explicit forward pass
  enc = jax.lax.conv_general_dilated(ex["x"][None], params["enc"]["w"], (1, 1), "SAME",
                                     dimension_numbers=layers.DN)[0] + params["enc"]["b"]
  h0 = layers.max_pool(enc, 3, 2)
  h1 = jax.lax.conv_general_dilated(jax.nn.relu(h0)[None], params["conv"][0]["w"], (2, 2),
                                    ((1, 1), (1, 1)), dimension_numbers=layers.DN)[0]
  h1 = h1 + params["conv"][0]["b"]
  h2 = jax.nn.relu(h1).reshape(-1) @ params["dense"][0]["w"] + params["dense"][0]["b"]
  logits = jax.nn.relu(h2) @ params["dense"][1]["w"] + params["dense"][1]["b"]
  np.testing.assert_allclose(problem.output(free.value), logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver_name,options", [
    ("bp", {"num_steps": 4}),
    ("rbp", {"free": TIGHT_FREE, "adjoint": TIGHT_ADJOINT}),
])
def test_ff_bp_and_rbp_match_exact_implicit_gradient(solver_name, options):
  problem, params, data = _setup("ff")
  est = _run(solvers.get_solver(solver_name, **options), problem, params, data)
  assert _rel_err(_flat(est.grads), _exact_implicit("ff")) < 1e-8


@pytest.mark.parametrize("solver_name", ["lcp_di", "lcp_kp"])
def test_ff_lcp_update_is_gradient_of_augmented_energy(solver_name):
  problem, params, data = _setup("ff", "softplus")
  opts = {"alpha": ALPHA, "free": TIGHT_FREE, "controlled": TIGHT_CONTROLLED}
  if solver_name == "lcp_kp":
    opts["feedback_init"] = "copy"  # B = theta: the KP circuit is then exactly DI
  solver = solvers.get_solver(solver_name, **opts)
  est = _run(solver, problem, params, data, solver.init(problem, params, jax.random.key(2)))
  assert bool(jnp.all(est.stats["controlled/converged"]))
  decay = (solver.weight_decay * _flat(params)) if solver_name == "lcp_kp" else 0.0
  assert _rel_err(_flat(est.grads) - decay, _exact_augmented("ff")) < 1e-7


def test_ff_kolen_pollack_feedback_convolutions():
  """Random feedback convolutions: the backward pathway uses them, and they
  receive the forward weights' local update (transposed), plus decay."""
  problem, params, data = _setup("ff", "softplus")
  kp = solvers.get_solver("lcp_kp", alpha=ALPHA, free=TIGHT_FREE,
                          controlled=dict(TIGHT_CONTROLLED, max_steps=3000))
  feedback = _f64(kp.init(problem, params, jax.random.key(3)))
  assert jax.tree.structure(feedback) == jax.tree.structure(params)
  assert feedback["conv"][0]["w"].shape == params["conv"][0]["w"].shape
  assert not np.allclose(feedback["conv"][0]["w"], params["conv"][0]["w"])
  est = _run(kp, problem, params, data, feedback)
  exact = _exact_augmented("ff")
  g = _flat(est.grads) - kp.weight_decay * _flat(params)
  assert _rel_err(g, exact) > 1e-3  # other feedback, other psi ...
  assert g @ exact > 0  # ... but still a descent direction of F
  np.testing.assert_allclose(_flat(est.solver_grads) - _flat(est.grads),
                             kp.weight_decay * (_flat(feedback) - _flat(params)), atol=1e-12)


def test_ff_rejects_images_too_small():
  with pytest.raises(ProblemError, match="too small"):
    cifar.ff_problem((4, 4, 3), channels=(4, 8, 8), hidden=(4,))


# ----------------------------------------------------------------- the DEQ

@pytest.mark.parametrize("solver_name,options", [
    ("rbp", {"free": TIGHT_FREE, "adjoint": TIGHT_ADJOINT}),
    ("bp", {"num_steps": 300}),
])
def test_deq_rbp_and_bp_match_exact_implicit_gradient(solver_name, options):
  problem, params, data = _setup("deq")
  est = _run(solvers.get_solver(solver_name, **options), problem, params, data)
  assert _rel_err(_flat(est.grads), _exact_implicit("deq")) < 1e-7


def test_deq_lcp_di_update_is_gradient_of_augmented_energy():
  problem, params, data = _setup("deq", "softplus")
  # Anderson (the default) lands differently per CPU ISA here, and rtol 1e-12 sat
  # at float64's edge: one example ran out of 20,000 steps without AVX-512.
  # Euler dt 0.5 to rtol 1e-10 takes <= 616 steps, errors ~8e-10 (either ISA).
  controlled = {"strategy": "euler", "strategy_options": {"dt": 0.5}, "rtol": 1e-10,
                "max_steps": 20000}
  est = _run(solvers.get_solver("lcp_di", alpha=ALPHA, free=TIGHT_FREE, controlled=controlled),
             problem, params, data)
  assert bool(jnp.all(est.stats["controlled/converged"]))
  assert _rel_err(_flat(est.grads), _exact_augmented("deq")) < 1e-7


def test_deq_rejects_bad_groups_and_pooling():
  with pytest.raises(ProblemError, match="divisible by groups"):
    cifar.deq_problem((8, 8, 3), channels=6, inner_channels=8, groups=4, pool=4)
  with pytest.raises(ProblemError, match="not divisible by pool"):
    cifar.deq_problem((6, 6, 3), channels=4, inner_channels=4, groups=2, pool=4)


# ----------------------------------------------------------------- data and tasks

def _config(name, data_dir, preset="quick"):
  from launch import config as cfglib
  config = cfglib.load(f"{name}:{preset}")
  config.data_dir = str(data_dir)
  return config


def test_missing_data_gives_the_loaders_error(tmp_path, monkeypatch):
  monkeypatch.delenv("BILEVEL_DATA_DIR", raising=False)
  import problems
  with pytest.raises(FileNotFoundError, match="BILEVEL_DATA_DIR"):
    problems.make_task(_config("cifar10_ff", tmp_path))
  config = _config("cifar10_deq", "")
  with pytest.raises(FileNotFoundError, match="BILEVEL_DATA_DIR"):
    problems.make_task(config)


def _write_batches(folder, n_per_batch=8, n_test=10, seed=0):
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True)
  for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, n).tolist()}
    with open(folder / name, "wb") as f:
      pickle.dump(batch, f)


@pytest.mark.parametrize("name", ["cifar10_ff", "cifar10_deq"])
def test_task_from_standard_files_trains_and_evaluates(tmp_path, name):
  _write_batches(tmp_path / "cifar-10-batches-py")
  config = _config(name, tmp_path)
  config.batch_size = 4
  config.problem_options.eval_batch_size = 4  # 10 test images -> last batch padded
  config.problem_options.augment = True
  config.problem_options.train_examples = 0
  config.problem_options.eval_examples = 0
  if name == "cifar10_ff":
    config.problem_options.channels = (2, 2)
    config.problem_options.hidden = (4,)
  else:
    config.problem_options.update(dict(channels=4, inner_channels=4, groups=2))
  import problems
  from launch import config as cfglib
  from bilevel.train import init_train_state, make_train_step, data_mesh
  import optax
  task = problems.make_task(config)
  assert task.steps_per_epoch == 40 // 4
  assert "lossless" in task.notes and "augmentation" in task.notes
  batch = task.train_batch(3)
  assert batch["x"].shape == (4, 32, 32, 3) and batch["label"].shape == (4,)
  np.testing.assert_array_equal(task.train_batch(3)["x"], batch["x"])  # pure in step
  config.solver = "rbp"
  solver = cfglib.build_solver(config)
  state = init_train_state(task.problem, solver, optax.sgd(0.01), jax.random.key(0),
                           task.example)
  if name == "cifar10_ff":  # one real training step (the DEQ's costs the same compile again)
    step = make_train_step(task.problem, solver, optax.sgd(0.01), mesh=data_mesh(1))
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    assert np.isfinite(float(metrics["loss"]))
  out = task.evaluate(state.params, solver)
  assert out["examples"] == 10 and 0.0 <= out["accuracy"] <= 1.0
  assert np.isfinite(out["loss"]) and out["free/converged_fraction"] > 0


@pytest.mark.parametrize("name", ["cifar10_ff", "cifar10_deq"])
@pytest.mark.parametrize("preset", [None, "quick", "anderson", "quick+anderson"])
def test_configs_validate_with_every_listed_solver(name, preset):
  from launch import config as cfglib
  config = cfglib.load(name + (f":{preset}" if preset else ""))
  for solver_name in config.solvers.keys():
    config.solver = solver_name
    cfglib.validate(config)
  if name == "cifar10_ff":
    depth = len(config.problem_options.channels) + len(config.problem_options.hidden) + 1
    assert config.solvers.bp.num_steps == depth
  with pytest.raises(cfglib.ConfigError, match="preset"):
    cfglib.load(f"{name}:nonsense")
