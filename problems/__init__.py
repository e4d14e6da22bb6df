"""Problem builders: ``config -> Task`` (see :mod:`problems.base`).

Entries are import paths so that building one problem never imports the
others (and their data). Add a problem: write ``problems/NAME.py`` with a
``build(config) -> Task`` function and add one line here.
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
