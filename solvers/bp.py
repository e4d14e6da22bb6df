"""``bp``: backprop through a fixed number of unrolled relaxation steps.

The reference any implicit method is measured against (and, for the complex
synapse, MAML). Memory grows linearly with ``num_steps``; the free relaxation's
strategy (Euler, Anderson, heavy-ball SGD, ...) is what gets unrolled. ``remat``
keeps only the iterates per step and recomputes the rest in the backward pass
(same gradient; e.g. 20-way Omniglot tasks unrolled 500 steps need 34 GB without).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from bilevel.fixed_point import Status
from bilevel.solver import BatchMask, GradientEstimate, PhaseStats, Solver


@dataclasses.dataclass(frozen=True)
class Backprop(Solver):
  """Differentiates the unrolled free phase; the only phase is ``free``."""
  name: ClassVar[str] = "bp"
  num_steps: int = 100
  remat: bool = False

  def __call__(self, problem, params, solver_params, batch, key, *,
               drop_invalid: bool = True) -> GradientEstimate:
    """The gradient of the mean loss after ``num_steps`` unrolled steps."""

    def batch_objective(p):
      def one(example):
        field = lambda s: problem.f(p, s, example)
        return self.free.unrolled(field, problem.init_state(p, example), self.num_steps,
                                  self.remat)
      res = jax.vmap(one)(batch)
      losses = jax.vmap(problem.outer_loss)(res.value, batch)
      valid = jax.lax.stop_gradient(jnp.isfinite(losses) & (res.status != Status.NONFINITE))
      mask = BatchMask(valid if drop_invalid else jnp.ones_like(valid), drop_invalid)
      return mask.mean(losses), (res, mask)

    (loss, (res, mask)), grads = jax.value_and_grad(batch_objective, has_aux=True)(params)
    outputs = jax.vmap(problem.output)(res.value)
    return GradientEstimate(grads, (), loss, outputs, {"free": PhaseStats.of(res)}, {},
                            mask.valid)
