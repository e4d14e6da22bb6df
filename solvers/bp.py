"""``bp``: backprop through a fixed number of unrolled relaxation steps.

The reference any implicit method is measured against (and, for the complex
synapse, MAML). Memory grows linearly with ``num_steps``; the free relaxation's
strategy (Euler, Anderson, heavy-ball SGD, ...) is what gets unrolled.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from solvers.base import GradientEstimate, Solver, relaxation_stats


@dataclasses.dataclass(frozen=True)
class Backprop(Solver):
  name: ClassVar[str] = "bp"
  num_steps: int = 100

  def __call__(self, problem, params, solver_params, batch) -> GradientEstimate:

    def batch_objective(p):
      def one(example):
        field = lambda s: problem.f(p, s, example)
        return self.free.unrolled(field, problem.init_state(p, example), self.num_steps)
      res = jax.vmap(one)(batch)
      loss, outputs = self.batch_loss(problem, res.value, batch)
      return loss, (res, outputs)

    (loss, (res, outputs)), grads = jax.value_and_grad(batch_objective, has_aux=True)(params)
    return GradientEstimate(grads, (), loss, outputs, relaxation_stats("free", res))
