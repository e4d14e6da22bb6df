"""Meta-gradient solvers, interchangeable by name on any bilevel problem.

``get_solver("lcp_di", alpha=0.05)`` builds one; :data:`REGISTRY` maps names to
classes. Adding a solver is one new module plus one entry here (the contract
test ``tests/test_solver_contract.py`` then runs it on every zoo problem). The
protocol (:class:`Solver`, :class:`GradientEstimate`, :class:`PhaseStats`) lives
in :mod:`bilevel.solver`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bilevel.relaxation import Relaxation, relaxation_from_config
from bilevel.solver import GradientEstimate, PhaseStats, Solver
from solvers.bp import Backprop
from solvers.cml import ContrastiveMetaLearning
from solvers.fomaml import FirstOrderMAML
from solvers.imaml import ImplicitMAML
from solvers.lcp_di import DynamicInversion
from solvers.lcp_direct import DirectControl
from solvers.lcp_ebd import EnergyBased
from solvers.lcp_kp import KolenPollack
from solvers.lcp_lf import LinearFeedback
from solvers.rbp import RecurrentBackprop
from solvers.reptile import Reptile
from solvers.t1t2 import T1T2

REGISTRY: dict[str, type[Solver]] = {
    "bp": Backprop,
    "rbp": RecurrentBackprop,
    "imaml": ImplicitMAML,
    "lcp_di": DynamicInversion,
    "lcp_kp": KolenPollack,
    "lcp_ebd": EnergyBased,
    "lcp_direct": DirectControl,
    "lcp_lf": LinearFeedback,
    # The meta-learning rule of eqs. 17-18 is direct control of the fast weights.
    "lcp": DirectControl,
    "cml": ContrastiveMetaLearning,
    "fomaml": FirstOrderMAML,
    "reptile": Reptile,
    "t1t2": T1T2,
}


def get_solver(name: str, **options: Any) -> Solver:
  """Builds the solver ``name`` with ``options`` (dataclass fields).

  Relaxation-valued options (``free``, ``controlled``, ``adjoint``) accept a
  dict such as ``{"strategy": "anderson", "max_steps": 200}``.
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown solver {name!r}; valid solvers are: "
                     f"{', '.join(sorted(REGISTRY))}")
  cls = REGISTRY[name]
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = set(options) - set(fields)
  if unknown:
    raise ValueError(f"solver {name!r} has no option(s) {sorted(unknown)}; valid options: "
                     f"{', '.join(sorted(fields))}")
  built = {}
  for key, value in options.items():
    default = fields[key].default
    if isinstance(default, Relaxation):
      value = relaxation_from_config(value, default)
    built[key] = value
  return cls(**built)


__all__ = ["REGISTRY", "get_solver", "GradientEstimate", "PhaseStats", "Solver"]
