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
  # The EBD steady state is the DI one (section 2.4): "dynamic_inversion"
  # reaches it with the DI dynamics (eq. 8, far fewer steps than the gradient
  # flow); psi* is still read as -f(phi*).
  dynamics: str = "energy"

  def __post_init__(self):
    super().__post_init__()
    if self.dynamics not in ("energy", "dynamic_inversion"):
      raise ValueError(f"lcp_ebd dynamics must be 'energy' or 'dynamic_inversion', got "
                       f"{self.dynamics!r}")

  def initial_state(self, problem, phi, example):
    z = super().initial_state(problem, phi, example)
    if self.dynamics == "dynamic_inversion":
      return lc.DIState(phi, tu.tree_zeros_like(phi), z.u)
    return z

  def field(self, problem, params, solver_params, example):
    if self.dynamics == "dynamic_inversion":
      return lc.dynamic_inversion_field(problem, params, example, self.controller)
    return lc.energy_based_field(problem, params, example, self.controller)

  def control(self, problem, params, solver_params, z, example):
    return tu.tree_scale(-1.0, problem.f(params, z.phi, example))
