"""CIFAR-10 tasks (Table 2): ``cifar10_ff`` and ``cifar10_deq``, config -> Task.

The models are :mod:`problems.models.cifar`. Data: :func:`problems.datasets.load_cifar10`
(``data_dir`` or ``$BILEVEL_DATA_DIR``; lossless python batches, else the LOSSY
JPEG copy, which every result must name -- the Task's notes do) or TFDS
(``problem_options.source="tfds"``). ``train_examples`` / ``eval_examples``
(0 = all) take seeded random subsets; ``augment`` adds random crops and flips.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bilevel.problem import BilevelProblem
from problems.base import Task
from problems.datasets import cifar10, sampling
from problems.evaluation import Evaluator
from problems.models.cifar import deq_problem, ff_problem

PyTree = Any

__all__ = ["build_ff", "build_deq", "load_split"]


def load_split(config: Any, split: str) -> tuple[np.ndarray, np.ndarray, str]:
  """(x, y, provenance note) for ``split`` from files or TFDS; never random data."""
  opts = config.problem_options
  data_dir = config.data_dir or None
  source = opts.get("source", "files")
  if source == "tfds":
    x, y = cifar10.load_cifar10_tfds(split, data_dir)
    return x, y, "CIFAR-10 from TFDS (lossless)"
  if source != "files":
    raise ValueError(f"problem_options.source must be 'files' or 'tfds', got {source!r}")
  x, y = cifar10.load_cifar10(split, data_dir)  # raises if missing: never random data
  root = Path(data_dir or os.environ.get("BILEVEL_DATA_DIR", "")).expanduser()
  lossless = cifar10.pickle_dir(root) is not None  # the loader's own preference order
  note = ("CIFAR-10 lossless python batches" if lossless else
          "CIFAR-10 LOSSY JPEG (q75) copy: pixels differ from the original; not "
          "comparable with published CIFAR-10 numbers")
  return x, y, note


def _subset(x: np.ndarray, y: np.ndarray, n: int, seed: int, tag: int):
  """A seeded random subset of size n (0 = all). Random, not the first n: the
  JPEG copy's test set is stored class by class."""
  if not n or n >= len(x):
    return x, y
  idx = np.random.default_rng([seed, tag]).permutation(len(x))[:n]
  idx.sort()
  return x[idx], y[idx]


def _train_batches(config: Any, x: np.ndarray, y: np.ndarray) -> Callable[[int], PyTree]:
  """``step -> batch``, with random crops and flips if ``problem_options.augment``."""
  do_augment = bool(config.problem_options.get("augment", False))
  aug = jax.jit(cifar10.augment, static_argnums=2)
  base_key = jax.random.key(config.seed)

  def train_batch(step: int) -> PyTree:
    xb, yb = sampling.get_batch(x, y, config.seed, step, config.batch_size)
    if do_augment:
      xb = np.asarray(aug(jax.random.fold_in(base_key, step), jnp.asarray(xb), 4))
    return {"x": xb, "label": yb}

  return train_batch


def _classification_task(config: Any, make_problem: Callable[[PyTree], BilevelProblem]) -> Task:
  opts = config.problem_options
  x_train, y_train, note = load_split(config, "train")
  x_test, y_test, _ = load_split(config, "test")
  x_train, y_train = _subset(x_train, y_train, int(opts.get("train_examples", 0)), config.seed, 1)
  x_test, y_test = _subset(x_test, y_test, int(opts.get("eval_examples", 0)), config.seed, 2)
  example = {"x": jnp.asarray(x_train[0]), "label": jnp.asarray(y_train[0])}
  problem = make_problem(example)
  evaluator = Evaluator(problem, num_devices=int(config.get("num_devices", 0) or 0))
  test_means = evaluator.make_evaluate({"": {"x": x_test, "label": y_test}},
                                       int(opts.get("eval_batch_size", 500)))
  evaluate = lambda params, solver: {**test_means(params, solver),
                                     "examples": float(len(x_test))}
  notes = note + (" | augmentation: random crop (pad 4) + flip"
                  if opts.get("augment", False) else "")
  if opts.get("train_examples", 0) or opts.get("eval_examples", 0):
    notes += (f" | subset: {len(x_train)} train / {len(x_test)} test examples "
              "(seeded random subsets)")
  return Task(problem=problem, example=example,
              steps_per_epoch=sampling.steps_per_epoch(len(x_train), config.batch_size),
              train_batch=_train_batches(config, x_train, y_train), evaluate=evaluate,
              notes=notes)


def build_ff(config: Any) -> Task:
  """``cifar10_ff``: the convolutional feedforward net (Table 2, C10 FF)."""
  o = config.problem_options
  return _classification_task(config, lambda ex: ff_problem(
      (32, 32, 3), tuple(o.channels), tuple(o.hidden), 10,
      enc_kernel=o.enc_kernel, kernel=o.kernel, stride=o.stride, padding=o.padding,
      pool_window=o.pool_window, pool_stride=o.pool_stride, activation=o.activation,
      conv_impl=o.conv_impl, example=ex))


def build_deq(config: Any) -> Task:
  """``cifar10_deq``: the deep equilibrium model (Table 2, C10 RNN)."""
  o = config.problem_options
  return _classification_task(config, lambda ex: deq_problem(
      (32, 32, 3), o.channels, o.inner_channels, 10, kernel=o.kernel, groups=o.groups,
      pool=o.pool, block_init_std=o.block_init_std, activation=o.get("activation", "relu"),
      conv_impl=o.conv_impl, example=ex))
