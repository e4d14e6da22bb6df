"""``lcp_ebd``: energy-based least control, eq. 10 / 15.

Gradient flow on ``1/2 ||f||^2`` plus output control; the control is read as
``psi* = -f(phi*)`` and Theorem 1 (eq. 4) gives the update.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from bilevel import least_control as lc
from bilevel import tree as tu


@dataclasses.dataclass(frozen=True)
class EnergyBased(lc.LeastControl):
  """``lcp_ebd``: gradient flow on 1/2||f||^2 plus output control; psi* = -f(phi*)."""
  name: ClassVar[str] = "lcp_ebd"

  def field(self, problem, params, solver_params, example):
    return lc.energy_based_field(problem, params, example, self.controller)

  def control(self, problem, params, solver_params, z, example):
    return tu.tree_scale(-1.0, problem.f(params, z.phi, example))
