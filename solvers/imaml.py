"""``imaml``: the implicit gradient (eq. 5) with a conjugate-gradient adjoint.

The natural choice for energy problems (``d_phi f = -Hessian E`` is
symmetric): for the complex synapse of eq. 16 it is iMAML's solve with
``I + Hessian(L_learn) / lambda``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from bilevel.relaxation import Relaxation
from solvers.rbp import RecurrentBackprop


@dataclasses.dataclass(frozen=True)
class ImplicitMAML(RecurrentBackprop):
  """``imaml``: recurrent backprop whose adjoint is solved by CG."""
  name: ClassVar[str] = "imaml"
  needs_energy: ClassVar[bool] = True
  adjoint_method: str = "cg"
  adjoint: Relaxation = Relaxation(rtol=1e-6, max_steps=50)
