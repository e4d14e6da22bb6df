"""``lcp_direct``: direct output control, ``dphi = f + P^T u`` (eq. 17).

With all of phi as output (meta-learning, eq. 16) and f = -grad L_learn -
lambda (phi - omega), the update is ``d omega = lambda u*`` (eq. 18).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from bilevel import least_control as lc


@dataclasses.dataclass(frozen=True)
class DirectControl(lc.LeastControl):
  """``lcp_direct``: ``dphi = f + P^T u`` (eq. 17); psi* = P^T u_c*."""
  name: ClassVar[str] = "lcp_direct"

  def field(self, problem, params, solver_params, example):
    return lc.direct_field(problem, params, example, self.controller)

  def control(self, problem, params, solver_params, z, example):
    _, control = self.controller(problem, z.phi, z.u, example)
    return problem.output_adjoint(z.phi, control)
