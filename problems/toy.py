"""A toy problem: an equilibrium RNN fitted to SYNTHETIC regression data.

Explicitly a toy, for testing the runner, checkpoints and sweeps in seconds --
no result on it means anything. The model is the equilibrium RNN of eq. 11,

    f(phi, theta, x) = -phi + W tanh(phi) + U x + b,

with the squared loss on the last ``n_out`` units. The data are ``n_train`` /
``n_test`` Gaussian inputs ``x`` (``[n_in]``) with targets ``0.5 tanh(A x)``
(``[n_out]``) for a fixed random teacher ``A``, all drawn from
``problem_options.data_seed`` (so the data set does not change with the run's
seed; the batch order does).

problem_options: n_hidden, n_in, n_out, n_train, n_test, data_seed, init_gain
(spectral norm of the initial W), nan_batch_steps (fault injection for tests:
every input of the training batches of these steps is NaN, so no example is
left to average -- one bad example alone is dropped by the train step).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bilevel.problem import BilevelProblem
from problems.base import Task, problem_options
from problems.datasets import sampling
from problems.evaluation import Evaluator

_DEFAULTS = {"n_hidden": 16, "n_in": 4, "n_out": 2, "n_train": 256, "n_test": 256,
             "data_seed": 0, "init_gain": 0.5, "nan_batch_steps": ()}


def make_data(opts: dict) -> dict:
  """Train/test arrays (float32): x ``[N, n_in]``, target ``[N, n_out]``."""
  rng = np.random.default_rng(int(opts["data_seed"]))
  teacher = rng.normal(size=(opts["n_out"], opts["n_in"])) / np.sqrt(opts["n_in"])
  out = {}
  for split in ("train", "test"):
    n = int(opts[f"n_{split}"])
    x = rng.normal(size=(n, opts["n_in"])).astype(np.float32)
    out[split] = {"x": x, "target": (0.5 * np.tanh(x @ teacher.T)).astype(np.float32)}
  return out


def make_problem(opts: dict) -> BilevelProblem:
  n, n_in, n_out = int(opts["n_hidden"]), int(opts["n_in"]), int(opts["n_out"])
  gain = float(opts["init_gain"])

  def init_params(key, example):
    k1, k2 = jax.random.split(key)
    f32 = jnp.float32  # float32 like the data, also when jax_enable_x64 is on
    w = jax.random.normal(k1, (n, n), f32) / jnp.sqrt(f32(n))
    w = w * (gain / jnp.linalg.norm(w, 2))
    u = jax.random.normal(k2, (n, n_in), f32) / jnp.sqrt(f32(n_in))
    return {"W": w.astype(f32), "U": u, "b": jnp.zeros((n,), f32)}

  def dynamics(params, phi, ex):
    return -phi + params["W"] @ jnp.tanh(phi) + params["U"] @ ex["x"] + params["b"]

  def loss(y, ex):
    return 0.5 * jnp.sum((y - ex["target"]) ** 2)

  def metrics(y, ex):
    return {"mse": jnp.mean((y - ex["target"]) ** 2)}

  example = {"x": jnp.zeros((n_in,), jnp.float32), "target": jnp.zeros((n_out,), jnp.float32)}
  return BilevelProblem(dynamics=dynamics, loss=loss, output=lambda phi: phi[n - n_out:],
                        init_state=lambda params, ex: jnp.zeros((n,), ex["x"].dtype),
                        init_params=init_params, metrics=metrics, name="toy_rnn",
                        example=example)


def build(config: Any) -> Task:
  """``config -> Task`` for the toy regression RNN (see the module docstring)."""
  opts = problem_options(config, _DEFAULTS, "toy")
  data = make_data(opts)
  problem = make_problem(opts)
  train, test = data["train"], data["test"]
  n_train = len(train["x"])
  batch_size, seed = int(config.batch_size), int(config.seed)
  spe = sampling.steps_per_epoch(n_train, batch_size)

  nan_steps = {int(s) for s in (opts["nan_batch_steps"] or ())}

  def train_batch(step: int) -> dict:
    idx = sampling.batch_indices(seed, step, n_train, batch_size)
    batch = {k: v[idx] for k, v in train.items()}
    if step in nan_steps:
      batch["x"] = np.full_like(batch["x"], np.nan)
    return batch

  # The whole test set in one batch.
  evaluator = Evaluator(problem, num_devices=int(config.get("num_devices", 0) or 0))
  evaluate = evaluator.make_evaluate({"": test}, len(test["x"]))

  example = jax.tree.map(lambda a: jnp.asarray(a[0]), train)
  return Task(problem=problem, example=example, steps_per_epoch=spe,
              train_batch=train_batch, evaluate=evaluate,
              notes="toy problem on synthetic data: for testing the tooling only")
