"""MNIST tasks (section 3.1): ``mnist_ff`` and ``mnist_rnn``, config -> Task.

The networks are :mod:`problems.models.mnist` (eq. 11). Training batches are a
pure function of ``(config.seed, step)``; evaluation is the free equilibrium on
the whole test set (``test/...``) and on the first ``eval_train_examples``
training images (``train/...``), see :mod:`problems.evaluation`.

Loss convention (``problem_options.batch_mean_loss``, default True): an
example's loss is ``CE / batch_size``, its share of the batch-mean
cross-entropy, as in the paper authors' code (details in the model's module).
"""

from __future__ import annotations

from typing import Any

from problems import datasets
from problems.base import Task, problem_options
from problems.evaluation import Evaluator
from problems.models.mnist import make_problem

DEFAULT_OPTIONS = {"width": 256, "activation": "tanh", "normalize": True, "data": "shipped",
                   "batch_mean_loss": True, "eval_batch_size": 1000,
                   "eval_train_examples": 10000}


def _load(opts: dict, data_dir: str, split: str):
  if opts["data"] == "shipped":
    return datasets.load_mnist(split, data_dir or None, normalize=opts["normalize"])
  if opts["data"] == "tfds":
    return datasets.load_mnist_tfds(split, data_dir or None, normalize=opts["normalize"])
  raise ValueError(f"problem_options.data must be 'shipped' or 'tfds', got {opts['data']!r}")


def build(config: Any, shape: str) -> Task:
  """The Task of the ``shape`` (``"ff"`` or ``"rnn"``) network from ``config``."""
  opts = problem_options(config, DEFAULT_OPTIONS, "mnist")
  data_dir = getattr(config, "data_dir", "") or ""
  x_train, y_train = _load(opts, data_dir, "train")
  x_test, y_test = _load(opts, data_dir, "test")
  batch_size = int(config.batch_size)
  scale = 1.0 / batch_size if opts["batch_mean_loss"] else 1.0
  problem = make_problem(shape, int(opts["width"]), activation=opts["activation"],
                         loss_scale=scale)
  seed = int(config.seed)

  def train_batch(step: int) -> dict:
    xb, yb = datasets.get_batch(x_train, y_train, seed, step, batch_size)
    return {"x": xb, "label": yb}

  # The first n training images (not a random subset): train/ scores stay comparable
  # between runs and seeds.
  n_tr = min(int(opts["eval_train_examples"]), len(x_train))
  sets = {"test/": {"x": x_test, "label": y_test}}
  if n_tr:
    sets["train/"] = {"x": x_train[:n_tr], "label": y_train[:n_tr]}
  # The outer loss is CE / batch_size: the metrics' unscaled cross_entropy is reported.
  evaluator = Evaluator(problem, loss=False, num_devices=int(config.get("num_devices", 0) or 0))
  notes = ("loss = CE / batch_size (the example's share of the batch-mean CE, as in "
           "the paper authors' code)" if opts["batch_mean_loss"] else "")
  return Task(problem=problem, example={"x": x_train[0], "label": y_train[0]},
              steps_per_epoch=datasets.steps_per_epoch(len(x_train), batch_size),
              train_batch=train_batch,
              evaluate=evaluator.make_evaluate(sets, int(opts["eval_batch_size"])),
              notes=notes)


def build_ff(config: Any) -> Task:
  """``mnist_ff``: 2 x ``width`` tanh hidden layers as a block-structured eq. 11."""
  return build(config, "ff")


def build_rnn(config: Any) -> Task:
  """``mnist_rnn``: one fully connected recurrent layer of ``width`` tanh units."""
  return build(config, "rnn")
