"""``reptile``: Reptile (Nichol et al. 2018) as a meta-gradient direction.

``grad_omega = (omega - phi_rho) / step_size``, with ``phi_rho`` the equilibrium
of ``E + rho L`` started at ``omega``. ``rho = query_weight``: 0 adapts on the
support set only (``phi_rho = phi*``); 1 adapts on all of the task's data
(support and query loss), as Reptile fits every sampled example of a training
task. Convention: an outer SGD step with learning rate ``eps`` on this
direction is Reptile's ``omega <- omega + (eps / step_size) (phi - omega)``; for
the complex synapse (eq. 16) with ``rho = 0``, ``step_size = 1/lambda`` makes the
direction ``lambda (omega - phi*) = grad L_learn(phi*)``, a gradient in the
units of the others. With ``rho > 0`` the reported training loss/metrics are
at ``phi_rho``, which has seen the query set (held-out scores come from
``Task.evaluate``). Needs ``phi_0 = omega`` as ``fomaml`` does.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from bilevel import tree as tu
from bilevel.solver import Gradient
from solvers.cml import nudged_equilibria
from solvers.fomaml import FastWeightSolver, fast_weight_embedding, first_example


@dataclasses.dataclass(frozen=True)
class Reptile(FastWeightSolver):
  """``reptile``: ``grad_omega = (omega - phi_rho) / step_size``."""
  name: ClassVar[str] = "reptile"
  query_weight: float = 0.0
  step_size: float = 1.0

  def init(self, problem, params, key):
    if not self.step_size > 0 or self.query_weight < 0:
      raise ValueError(f"reptile needs step_size > 0 and query_weight >= 0, got "
                       f"{self.step_size}, {self.query_weight}")
    return super().init(problem, params, key)

  def first_phase(self, problem, params, batch):
    """The adaptation phase, reported as ``free``: of E (rho = 0) or E + rho L."""
    if not self.query_weight:
      return self.free_equilibrium(problem, params, batch)
    starts = jax.vmap(problem.init_state, in_axes=(None, 0))(params, batch)
    return nudged_equilibria(problem, params, batch, self.query_weight, self.free, starts)

  def gradient(self, problem, params, solver_params, batch, free, mask, key) -> Gradient:
    """Mean of ``omega - phi_rho`` over the tasks, over ``step_size``."""
    embed = fast_weight_embedding(problem, params, first_example(batch), self.name)
    starts = jax.vmap(problem.init_state, in_axes=(None, 0))(params, batch)
    direction = mask.mean(tu.tree_sub(starts, free.value))
    return Gradient(embed(tu.tree_scale(1.0 / self.step_size, direction)), (), {}, {}, mask)
