"""Omniglot complex-synapse meta-learning: conv net, problem, every solver, devices.

Tiny instances only (5-way, 14x14 images, a few channels, a handful of inner
steps): these check wiring and exactness, never accuracy or wall-clock.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import problems
import solvers
from launch import config as cfglib
from bilevel.train import data_mesh, init_train_state, make_train_step, replicate_on
from configs import omniglot as omniglot_config
from problems import convnet

ALL_SOLVERS = ("lcp", "imaml", "cml", "rbp", "t1t2", "fomaml", "reptile", "bp")


def _config(**options):
  c = omniglot_config.get_config("test")
  c.problem_options.update(dict(blocks=1, channels=4))
  c.problem_options.update(options)
  return c


@functools.lru_cache(maxsize=None)
def _task(**options):
  return problems.make_task(_config(**options))


def _solver(config, name):
  return solvers.get_solver(name, **cfglib.to_dict(config.solvers[name]))


# ----- the conv net -------------------------------------------------------------------

def test_matmul_convolution_equals_lax_convolution():
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, 7, 6, 5))
  w = jax.random.normal(kw, (3, 3, 5, 4))
  g = jax.random.normal(kg, (3, 7, 6, 4))
  outs = {impl: convnet.conv3x3(x, w, impl) for impl in convnet.CONV_IMPLS}
  np.testing.assert_allclose(outs["matmul"], outs["lax"], rtol=1e-10, atol=1e-10)
  grads = {impl: jax.grad(lambda x, w: jnp.vdot(convnet.conv3x3(x, w, impl), g),
                          argnums=(0, 1))(x, w) for impl in convnet.CONV_IMPLS}
  for a, b in zip(grads["matmul"], grads["lax"]):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_convnet_shapes_and_per_task_batch_norm():
  net = convnet.make_convnet(n_way=5, channels=4, blocks=4)
  x = jax.random.uniform(jax.random.key(1), (6, 28, 28, 1))
  params = net.init(jax.random.key(2), x)
  apply = jax.jit(net.apply)
  assert apply(params, x).shape == (6, 5)
  assert params["head"]["w"].shape == (4, 5)  # 28 -> 14 -> 7 -> 3 -> 1
  assert set(params["block1"]) == {"w", "scale", "offset"}
  # Batch statistics of the batch given: normalised channels have mean 0, var 1.
  y = convnet.batch_norm(3.0 + 2.0 * x, jnp.ones(1), jnp.zeros(1))
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-6)
  np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), 1.0, rtol=1e-4)
  # ... so one image's logits depend on the rest of its task's batch.
  assert not np.allclose(apply(params, x)[:3], apply(params, x[:3]))
  lax_net = convnet.make_convnet(n_way=5, channels=4, blocks=4, conv_impl="lax")
  np.testing.assert_allclose(jax.jit(lax_net.apply)(params, x), apply(params, x),
                             rtol=1e-8, atol=1e-8)


# ----- the problem (eq. 16) -----------------------------------------------------------

def test_inner_dynamics_is_the_complex_synapse_field():
  """f = -grad L_learn(phi; support) - lambda (phi - omega), with all of phi output."""
  task = _task()
  problem, ex = task.problem, task.example
  omega = problem.init_params(jax.random.key(0), ex)
  phi = jax.tree.map(lambda w: w + 0.1 * jnp.cos(w), omega)
  net = convnet.make_convnet(5, 4, 1)
  learn = lambda p: convnet.cross_entropy(net.apply(p, ex["support_x"]), ex["support_y"])
  expected = jax.tree.map(lambda g, p, o: -g - 0.5 * (p - o), jax.grad(learn)(phi), phi,
                          omega)
  np.testing.assert_allclose(ravel_pytree(problem.f(omega, phi, ex))[0],
                             ravel_pytree(expected)[0], rtol=1e-6, atol=1e-7)
  assert problem.init_state(omega, ex) is omega
  np.testing.assert_allclose(problem.outer_loss(phi, ex), convnet.cross_entropy(
      net.apply(phi, ex["query_x"]), ex["query_y"]), rtol=1e-7)


def test_task_data_is_seeded_and_reproducible():
  task = _task()
  a, b = task.train_batch(3), task.train_batch(3)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["support_x"], task.train_batch(4)["support_x"])
  assert a["support_x"].shape == (4, 5, 14, 14, 1)   # meta-batch 4, 5-way 1-shot
  assert a["query_x"].shape == (4, 10, 14, 14, 1)    # 2 query images per class
  np.testing.assert_array_equal(a["query_y"][0], np.repeat(np.arange(5), 2))


def test_learned_lambda_is_a_meta_parameter():
  task = _task(learn_lambda=True)
  params = task.problem.init_params(jax.random.key(0), task.example)
  assert set(params) == {"omega", "log_lambda"}
  np.testing.assert_allclose(params["log_lambda"]["head"]["b"], np.log(0.5))
  solver = _solver(_config(learn_lambda=True), "t1t2")
  est = jax.jit(lambda p, b: solver(task.problem, p, (), b, jax.random.key(0)))(params, task.train_batch(0))
  assert float(jnp.abs(ravel_pytree(est.grads["log_lambda"])[0]).max()) > 0


# ----- every solver on the same problem object ---------------------------------------

@pytest.mark.parametrize("name", ALL_SOLVERS)
def test_every_solver_trains_on_omniglot(name):
  config, task = _config(), _task()
  solver = _solver(config, name)
  opt = optax.sgd(1.0)
  mesh = data_mesh(1)
  state = replicate_on(mesh, init_train_state(task.problem, solver, opt, jax.random.key(0),
                                              task.example))
  new, metrics = make_train_step(task.problem, solver, opt, mesh=mesh)(
      state, task.train_batch(0))
  grads = ravel_pytree(jax.tree.map(lambda a, b: a - b, state.params, new.params))[0]
  assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.linalg.norm(grads)) > 0
  # The inner solve reports its residual ||f||, so non-converged tasks show.
  assert float(metrics["free/residual"]) > 0 and "free/converged_fraction" in metrics
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0
  if name == "lcp":  # d omega = lambda u*: a nonzero control was applied
    assert float(metrics["psi_norm"]) > 0


def test_two_devices_give_the_one_device_meta_gradient():
  assert len(jax.devices()) >= 2, "tests/conftest.py forces 2 host devices"
  config, task = _config(), _task()
  batch = task.train_batch(0)
  for name in ("lcp",):
    solver = _solver(config, name)
    opt = optax.sgd(1.0)  # new params = params - grads: compares the meta-gradients
    out = []
    for n in (1, 2):
      mesh = data_mesh(n)
      state = replicate_on(mesh, init_train_state(task.problem, solver, opt,
                                                  jax.random.key(0), task.example))
      new, _ = make_train_step(task.problem, solver, opt, mesh=mesh)(state, batch)
      out.append(ravel_pytree(jax.tree.map(lambda a, b: a - b, state.params,
                                           new.params))[0])
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-7)


# ----- evaluation and configs ---------------------------------------------------------

def test_evaluate_reports_accuracy_interval_and_official_runs():
  config = _config(n_way=20, eval_tasks=6, eval_batch_size=3, official_runs=True)
  task = problems.make_task(config)
  params = task.problem.init_params(jax.random.key(0), task.example)
  out = task.evaluate(params, _solver(config, "fomaml"))
  assert out["test_tasks"] == 6
  assert 0 <= out["test_accuracy"] <= 1 and out["test_accuracy_ci95"] > 0
  assert 0 <= out["official_runs_accuracy"] <= 1
  assert out["test_free_residual_max"] >= out["test_free_residual"] > 0
  assert "600" in task.notes  # fewer meta-test tasks than the protocol says so


@pytest.mark.parametrize("preset", [None, "quick", "test"])
def test_configs_validate_and_every_solver_builds(preset):
  config = omniglot_config.get_config(preset)
  cfglib.validate(config)
  assert set(ALL_SOLVERS) <= set(config.solvers)
  for name in ALL_SOLVERS:
    _solver(config, name)
  if preset is None:  # the paper-scale protocol (CML authors' recipe)
    o = config.problem_options
    assert (o.n_way, o.k_shot, o.lam, config.batch_size, config.num_epochs) == (
        20, 1, 0.5, 16, 30)
    assert config.solvers.cml.beta == 0.03 and config.solvers.cml.nudged.max_steps == 100
    assert config.solvers.lcp.free.max_steps == 200
    assert o.eval_tasks >= 600
