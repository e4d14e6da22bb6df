"""Implicit neural representation (problems/models/inr.py, builder in problems/inr.py).

Gradients on a tiny instance (float64) against independent exact answers from
tests/zoo.py: bp and rbp against the implicit-function-theorem gradient (eq.
5, dense inverse); lcp_di at a finite alpha against grad_theta min_phi F
(envelope theorem at the Newton minimiser of F = 1/2||f||^2 + L/alpha).
Images: matplotlib's sample data (always installed) and files written here;
no test needs scikit-image.
"""

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from PIL import Image

import solvers
import zoo
from problems import inr
from problems.models import inr as inr_model

TIGHT_FREE = {"strategy": "anderson", "strategy_options": {"dt": 0.5}, "rtol": 1e-12,
              "max_steps": 5000}
TIGHT_CONTROLLED = {"strategy": "anderson", "strategy_options": {"dt": 0.3, "memory": 8},
                    "rtol": 1e-12, "max_steps": 20000}
ALPHA = 0.5


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def _rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@functools.lru_cache(maxsize=None)
def _setup(activation="tanh"):
  k1, k2 = jax.random.split(jax.random.key(0))
  data = {"coords": jax.random.uniform(k1, (3, 2), jnp.float64),
          "rgb": jax.random.uniform(k2, (3, 3), jnp.float64)}
  ex = jax.tree.map(lambda a: a[0], data)
  problem = inr_model.inr_problem(inr_model.fourier_matrix(3, 2.0, 0), hidden=5,
                                  out_channels=3, activation=activation,
                                  recurrent_scale=2.0, spectral_bound=0.8, example=ex)
  params = problem.init_params(jax.random.key(1), ex)
  assert jax.tree.leaves(params)[0].dtype == jnp.float64
  return problem, params, data


@pytest.mark.parametrize("solver_name,options", [
    ("bp", {"num_steps": 200}),
    ("rbp", {"free": TIGHT_FREE, "adjoint": {"rtol": 1e-12, "max_steps": 5000}}),
])
def test_bp_and_rbp_match_exact_implicit_gradient(solver_name, options):
  problem, params, data = _setup("relu")
  est = solvers.get_solver(solver_name, **options)(problem, params, (), data, jax.random.key(0))
  exact = _flat(zoo.exact_implicit_gradient(problem, params, data))
  assert _rel_err(_flat(est.grads), exact) < 1e-8


def test_lcp_di_update_is_gradient_of_augmented_energy():
  problem, params, data = _setup("tanh")
  est = solvers.get_solver("lcp_di", alpha=ALPHA, free=TIGHT_FREE,
                           controlled=TIGHT_CONTROLLED)(problem, params, (), data, jax.random.key(0))
  assert bool(jnp.all(est.stats["controlled/converged"]))
  total = 0.0
  for i in range(3):
    ex = jax.tree.map(lambda a: a[i], data)
    _, phi = zoo.augmented_energy_value(problem, params, ex, ALPHA)
    half_sq = lambda p: 0.5 * sum(jnp.sum(v ** 2) for v in
                                  jax.tree.leaves(problem.f(p, phi, ex)))
    total = total + _flat(jax.grad(half_sq)(params))
  assert _rel_err(_flat(est.grads), total / 3) < 1e-7


def test_spectral_bound_makes_the_free_dynamics_a_contraction():
  """With the identity activation d f_h / d h + I is the W used in f."""
  problem, params, data = _setup("tanh")
  ex = jax.tree.map(lambda a: a[0], data)
  lin = inr_model.inr_problem(inr_model.fourier_matrix(3, 2.0, 0), hidden=5,
                              activation="identity", spectral_bound=0.8, power_iterations=50,
                              example=ex)
  big = dict(params, W=10.0 * params["W"])
  state = lin.init_state(big, ex)
  jac = jax.jacobian(lambda h: lin.f(big, (h, state[1]), ex)[0])(state[0])
  w_used = jac + jnp.eye(5)
  assert abs(float(jnp.linalg.norm(w_used, 2)) - 0.8) < 1e-6
  np.testing.assert_allclose(w_used, big["W"] * 0.8 / jnp.linalg.norm(big["W"], 2), atol=1e-6)
  small = dict(params, W=0.01 * params["W"] / jnp.linalg.norm(params["W"], 2))
  jac = jax.jacobian(lambda h: lin.f(small, (h, state[1]), ex)[0])(state[0])
  np.testing.assert_allclose(jac + jnp.eye(5), small["W"], atol=1e-12)  # below the bound


def test_load_image_sources(tmp_path, monkeypatch):
  grace = inr.load_image("grace_hopper", 16)
  assert grace.shape == (16, 16, 3) and grace.dtype == np.float32
  assert 0.0 <= grace.min() and grace.max() <= 1.0
  rgb = np.zeros((10, 20, 3), np.uint8)
  rgb[:, 5:15] = 255  # the centre square (after cropping 10x20 -> 10x10) is white
  Image.fromarray(rgb).save(tmp_path / "im.png")
  np.testing.assert_allclose(inr.load_image(str(tmp_path / "im.png"), 10), 1.0)
  Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
  assert inr.load_image(str(tmp_path / "grey.png"), 4).shape == (4, 4, 1)
  with pytest.raises(FileNotFoundError, match="not found"):
    inr.load_image(str(tmp_path / "nope.png"), 8)
  monkeypatch.setitem(sys.modules, "skimage", None)
  monkeypatch.setitem(sys.modules, "skimage.data", None)
  with pytest.raises(ImportError, match="pip install scikit-image"):
    inr.load_image("astronaut", 8)


def test_grid_and_psnr():
  grid = inr.pixel_grid(4)
  assert grid.shape == (4, 4, 2) and grid[1, 2].tolist() == [0.25, 0.5]
  assert inr.psnr(0.01) == pytest.approx(20.0)
  assert inr.psnr(1.0) == 0.0


def test_task_trains_and_evaluates(tmp_path):
  from launch import config as cfglib
  from bilevel.train import data_mesh, init_train_state, make_train_step
  import optax
  import problems
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "x.png")
  config = cfglib.load("inr:quick")
  config.problem_options.update(dict(image=str(tmp_path / "x.png"), size=8,
                                     fourier_features=4, hidden=6, eval_batch_size=12))
  config.batch_size = 4
  task = problems.make_task(config)
  assert task.steps_per_epoch == 16 // 4  # 4x4 training grid
  batch = task.train_batch(1)
  assert batch["coords"].shape == (4, 2) and batch["rgb"].shape == (4, 3)
  assert np.all(np.asarray(batch["coords"]) * 8 % 2 == 0)  # even rows/cols only
  config.solver = "rbp"
  solver = cfglib.build_solver(config)
  opt = optax.adam(1e-2)
  state = init_train_state(task.problem, solver, opt, jax.random.key(0), task.example)
  step = make_train_step(task.problem, solver, opt, mesh=data_mesh(1))
  state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
  assert np.isfinite(float(metrics["loss"]))
  out = task.evaluate(state.params, solver)
  assert out["examples"] == 64
  assert out["psnr"] == pytest.approx(-10 * math.log10(out["mse"]))
  # the full grid is the union of the training grid and the held-out pixels
  held = (out["mse"] * 64 - out["train_mse"] * 16) / 48
  assert out["psnr_heldout"] == pytest.approx(-10 * math.log10(held))


@pytest.mark.parametrize("preset", [None, "quick", "anderson", "quick+anderson"])
def test_config_validates_with_every_listed_solver(preset):
  from launch import config as cfglib
  config = cfglib.load("inr" + (f":{preset}" if preset else ""))
  for name in config.solvers.keys():
    config.solver = name
    cfglib.validate(config)
  assert config.solvers.lcp_di.controlled.strategy == "anderson"
