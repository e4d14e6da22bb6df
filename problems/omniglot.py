"""Few-shot Omniglot with complex synapses (section 3.2, eq. 16), as a Task.

The bilevel problem, stated for ONE task ``tau`` (support and query set):

* fast weights ``phi`` (all parameters of the conv-4 net of
  :mod:`problems.convnet`, batch-norm scale/offset and head included) minimise
  the inner energy

      E(theta, phi, tau) = L_learn(phi; support) + lambda/2 ||phi - omega||^2

  so the inner dynamics is ``f = -grad_phi E = -grad L_learn - lambda (phi -
  omega)`` (the first-order condition under eq. 16), started at ``phi = omega``;
* the outer loss is ``L_eval(phi; query)`` (cross-entropy), read on all of
  ``phi`` (the output map is the identity, as in eq. 17);
* the meta-parameters are ``theta = omega`` (params have exactly phi's
  structure), or with ``learn_lambda=True`` ``theta = {"omega": omega,
  "log_lambda": log lambda}``, a learned per-synapse strength (same tree as
  omega; ``lambda = exp(log_lambda)`` keeps it positive).

Every solver in ``solvers/`` works on this one problem object: ``lcp`` (direct
control of phi, eqs. 17-18), ``imaml`` (CG on ``I + Hessian/lambda``),
``rbp``, ``cml`` (symmetric nudged phases), ``t1t2``, ``fomaml``, ``reptile``
and ``bp`` (backprop through the unrolled inner loop, i.e. MAML with the
proximal term).

Data (:mod:`problems.datasets.omniglot`): ``problem_options.protocol``
"vinyals" (Vinyals splits, rotations as extra classes) or "cml" (the CML recipe),
28x28, N-way K-shot tasks with ``n_query`` query images per class; training
meta-batches are a pure function of ``(config.seed, step)``, the evaluation tasks
a pure function of ``problem_options.eval_seed`` (so every solver and seed is
scored on the same tasks).

Evaluation (``Task.evaluate(params, solver)``): the solver's free relaxation
(the meta-test inner loop, identical to training) on ``eval_tasks`` tasks of
``eval_split``; returns the mean query accuracy with its 95% interval
half-width (1.96 standard errors over tasks), and the accuracy on the 20
official one-shot runs of Lake et al. (2015) (20-way 1-shot only), with the
inner residuals so that non-converged tasks are visible.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bilevel import tree as tu
from bilevel.problem import BilevelProblem
from problems import convnet
from problems.base import Task
from problems.datasets import omniglot as omni
from problems.evaluation import Evaluator, num_examples

PyTree = Any

DEFAULT_OPTIONS = dict(
    n_way=20, k_shot=1, n_query=15, image_size=28, channels=64, blocks=4,
    lam=0.5, learn_lambda=False, conv_impl="matmul", train_split="train",
    steps_per_epoch=125, eval_split="test", eval_tasks=600, eval_n_query=15,
    eval_batch_size=20, eval_seed=1234, official_runs=True, net="maxpool",
    # "vinyals" (rotated classes at meta-train and meta-test) or "cml" (background
    # alphabets + rotations / unrotated evaluation alphabets): docs/omniglot_protocol.md.
    protocol="vinyals")


def _options(config: Any) -> dict:
  given = dict(config.problem_options) if config.get("problem_options") else {}
  unknown = set(given) - set(DEFAULT_OPTIONS)
  if unknown:
    raise ValueError(f"unknown problem_options {sorted(unknown)} for 'omniglot'; valid: "
                     f"{', '.join(sorted(DEFAULT_OPTIONS))}")
  return {**DEFAULT_OPTIONS, **given}


def slow_weights(params: PyTree, learn_lambda: bool) -> PyTree:
  """omega, the part of theta that phi starts from and is pulled towards."""
  return params["omega"] if learn_lambda else params


def make_problem(n_way: int = 20, channels: int = 64, blocks: int = 4, lam: float = 0.5,
                 learn_lambda: bool = False, conv_impl: str = "matmul",
                 example: PyTree = None, net: str = "maxpool") -> BilevelProblem:
  """The complex-synapse problem of eq. 16 on the conv-4 net (for one task).

  ``net`` picks the conv-4 variant (:data:`problems.convnet.NETS`): ``"maxpool"``
  (the paper's; E is not differentiable at the ReLU / max-pool kinks) or
  ``"smooth"`` (softplus + average pool; E smooth, so phi* with grad E = 0 exists
  and is reached).

  A task is ``{"support_x" [n_way*k_shot, S, S, 1], "support_y" int [n_way*k_shot],
  "query_x" [n_way*n_query, S, S, 1], "query_y" int [n_way*n_query]}``.
  """
  if lam <= 0:
    raise ValueError(f"lam must be positive (the complex synapse's strength), got {lam}")
  net_name = net
  net = convnet.make_convnet(n_way, channels, blocks, conv_impl, net_name)

  def strength(params):
    if learn_lambda:
      return jax.tree.map(jnp.exp, params["log_lambda"])
    return None

  def energy(params, phi, task):
    omega = slow_weights(params, learn_lambda)
    learn = convnet.cross_entropy(net.apply(phi, task["support_x"]), task["support_y"])
    lams = strength(params)
    if lams is None:
      prox = 0.5 * lam * tu.tree_vdot(tu.tree_sub(phi, omega), tu.tree_sub(phi, omega))
    else:
      prox = 0.5 * sum(jnp.sum(l * (p - o) ** 2) for l, p, o in zip(
          jax.tree.leaves(lams), jax.tree.leaves(phi), jax.tree.leaves(omega)))
    return learn + prox

  def loss(phi, task):
    return convnet.cross_entropy(net.apply(phi, task["query_x"]), task["query_y"])

  def metrics(phi, task):
    return {"accuracy": convnet.accuracy(net.apply(phi, task["query_x"]), task["query_y"])}

  def init_params(key, task):
    omega = net.init(key, jnp.asarray(task["support_x"]))
    if not learn_lambda:
      return omega
    return {"omega": omega,
            "log_lambda": jax.tree.map(lambda w: jnp.full_like(w, math.log(lam)), omega)}

  return BilevelProblem(
      energy=energy, loss=loss, init_state=lambda params, task: slow_weights(
          params, learn_lambda),
      init_params=init_params, metrics=metrics,
      name="omniglot_complex_synapse" + ("_smooth" if net_name == "smooth" else ""),
      example=example)


def _ci95(values: np.ndarray) -> float:
  if len(values) < 2:
    return float("nan")
  return float(1.96 * np.std(values, ddof=1) / math.sqrt(len(values)))


def build(config: Any) -> Task:
  """``config -> Task`` for ``python launch/run.py --config omniglot[:quick]``."""
  o = _options(config)
  for key in ("n_way", "k_shot", "n_query", "eval_n_query", "eval_tasks", "eval_batch_size",
              "steps_per_epoch"):
    if int(o[key]) < 1:
      raise ValueError(f"problem_options.{key} must be >= 1, got {o[key]}")
  data_dir = config.get("data_dir", "") or None
  size = int(o["image_size"])
  train_images, _ = omni.load_omniglot(o["train_split"], size, data_dir, o["protocol"])
  test_images, _ = omni.load_omniglot(o["eval_split"], size, data_dir, o["protocol"])
  n_way, k_shot = int(o["n_way"]), int(o["k_shot"])
  example = omni.sample_task(int(config.seed), train_images, n_way, k_shot, int(o["n_query"]))
  problem = make_problem(n_way, int(o["channels"]), int(o["blocks"]), float(o["lam"]),
                         bool(o["learn_lambda"]), o["conv_impl"], example=example,
                         net=str(o["net"]))

  def train_batch(step: int) -> dict:
    return omni.sample_meta_batch(int(config.seed), int(step), train_images,
                                  int(config.batch_size), n_way, k_shot, int(o["n_query"]))

  eb = int(o["eval_batch_size"])
  n_batches = -(-int(o["eval_tasks"]) // eb)
  eval_batches = [omni.sample_meta_batch(int(o["eval_seed"]), i, test_images, eb, n_way,
                                         k_shot, int(o["eval_n_query"]))
                  for i in range(n_batches)]
  official = None
  notes = [f"conv-4 net {o['net']!r} (inner energy "
           f"{'smooth' if o['net'] == 'smooth' else 'not smooth: ReLU/max-pool kinks'})"]
  if o["official_runs"]:
    if n_way == 20 and k_shot == 1:
      official = omni.official_one_shot_runs(size, data_dir, o["protocol"])
    else:
      notes.append("official one-shot runs skipped (they are 20-way 1-shot)")
  eval_tasks = jax.tree.map(lambda *parts: np.concatenate(parts), *eval_batches)
  evaluator = Evaluator(problem, residual=True,
                        num_devices=int(config.get("num_devices", 0) or 0))

  def evaluate(params, solver) -> dict:
    per_task = evaluator.per_example(params, solver, eval_tasks, eb)
    acc = per_task["accuracy"]
    out = {"test_accuracy": float(np.mean(acc)), "test_accuracy_ci95": _ci95(acc),
           "test_tasks": float(len(acc)), "test_loss": float(np.mean(per_task["loss"])),
           "test_free_converged_fraction": float(np.mean(
               per_task["free/converged_fraction"])),
           "test_free_residual": float(np.mean(per_task["free/residual"])),
           "test_free_residual_max": float(np.max(per_task["free/residual"])),
           "test_free_iterations": float(np.mean(per_task["free/iterations"]))}
    if official is not None:
      runs = evaluator.per_example(params, solver, official, num_examples(official))
      out["official_runs_accuracy"] = float(np.mean(runs["accuracy"]))
      out["official_runs_ci95"] = _ci95(runs["accuracy"])
    return out

  if int(o["eval_tasks"]) < 600:
    notes.append(f"meta-test on {o['eval_tasks']} tasks (< 600: a quick preset)")
  return Task(problem=problem, example=example, steps_per_epoch=int(o["steps_per_epoch"]),
              train_batch=train_batch, evaluate=evaluate, notes="; ".join(notes))
