"""Problem builders: ``config -> Task`` (see :mod:`problems.base`).

Layout: ``models/`` holds the ``BilevelProblem`` factories (one example, no
config, no data), ``layers`` and ``losses`` their shared pieces,
``convnet`` the haiku conv net of Omniglot, ``datasets/`` the data,
``evaluation`` the one evaluator every ``Task.evaluate`` is made from, and
``NAME.py`` the builder of each experiment (config -> data + model + Task).
Problems never build solvers: ``Task.evaluate(params, solver)`` is given one.

Entries are import paths so that building one problem never imports the
others (and their data). Add a problem: write its model (``problems/models/``),
a ``build(config) -> Task`` function in ``problems/NAME.py``, and one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from problems.base import Task

REGISTRY: dict[str, str] = {
    # name: "module:function"
    "cifar10_ff": "problems.cifar:build_ff",
    "cifar10_deq": "problems.cifar:build_deq",
    "inr": "problems.inr:build",
    "mnist_ff": "problems.mnist:build_ff",
    "mnist_rnn": "problems.mnist:build_rnn",
    "omniglot": "problems.omniglot:build",
    "toy": "problems.toy:build",
}


def make_task(config: Any) -> Task:
  """Builds the Task named by ``config.problem``."""
  name = config.problem
  if name not in REGISTRY:
    raise ValueError(f"unknown problem {name!r}; valid problems are: "
                     f"{', '.join(sorted(REGISTRY)) or '(none registered)'}")
  module, func = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), func)(config)


__all__ = ["REGISTRY", "Task", "make_task"]
