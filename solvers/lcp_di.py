"""``lcp_di``: least control by dynamic inversion, eq. 8 (eq. 14 for RNNs).

psi relaxes on ``d_phi f^T psi + P^T u`` while phi relaxes on ``f + psi``; at
the controlled steady state Theorem 1 (eq. 4) gives the update. The flow is
:class:`bilevel.least_control.LeastControl`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from bilevel import least_control as lc
from bilevel import tree as tu


@dataclasses.dataclass(frozen=True)
class DynamicInversion(lc.LeastControl):
  """``lcp_di``: eq. 8 -- psi relaxes on ``d_phi f^T psi + P^T u``."""
  name: ClassVar[str] = "lcp_di"
  tau_psi: float = 1.0

  def initial_state(self, problem, phi, example):
    z = super().initial_state(problem, phi, example)
    return lc.DIState(phi, tu.tree_zeros_like(phi), z.u)

  def feedback_params(self, params, solver_params):
    """The weights of the backward pathway (the forward ones for plain DI)."""
    return None

  def field(self, problem, params, solver_params, example):
    return lc.dynamic_inversion_field(
        problem, params, example, self.controller,
        feedback_params=self.feedback_params(params, solver_params),
        tau_psi=self.tau_psi)

  def control(self, problem, params, solver_params, z, example):
    return z.psi
