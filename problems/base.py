"""What an experiment needs beyond the bilevel problem: data and evaluation.

A config (``configs/NAME.py``) names a problem builder in
``problems.REGISTRY``; the builder turns the config into a :class:`Task`.
The runner (``launch/run.py``) and the benchmarks only talk to Tasks, so a new
experiment is one builder plus one config file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from bilevel.problem import BilevelProblem

PyTree = Any


@dataclasses.dataclass
class Task:
  """A bilevel problem with its data.

  problem: the :class:`BilevelProblem` (stated for one example).
  example: one example (no batch axis), used to initialise and validate.
  steps_per_epoch: number of training batches per epoch.
  train_batch: ``step -> batch`` (numpy pytree with a leading batch axis),
    deterministic in (config seed, step) so resumed runs see the same data.
  evaluate: ``(params, solver) -> dict`` of held-out metrics (host floats);
    e.g. test accuracy over the whole test set.
  notes: caveats printed with the results (e.g. "CIFAR-10 lossy JPEG copy").
  """
  problem: BilevelProblem
  example: PyTree
  steps_per_epoch: int
  train_batch: Callable[[int], PyTree]
  evaluate: Optional[Callable[[PyTree, Any], dict]] = None
  notes: str = ""


def problem_options(config: Any, defaults: dict, problem: str) -> dict:
  """``config.problem_options`` over ``defaults``. Unknown keys raise: a misspelt
  option must not silently leave its default in place."""
  given = config.get("problem_options", None) or {}
  given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
  unknown = set(given) - set(defaults)
  if unknown:
    raise ValueError(f"unknown problem_options {sorted(unknown)} for {problem!r}; valid: "
                     f"{', '.join(sorted(defaults))}")
  return {**defaults, **given}
