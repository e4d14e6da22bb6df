"""bilevel: bilevel optimisation and local learning at equilibrium in JAX.

Core pieces (one concept per module):

* :mod:`bilevel.problem` -- :class:`BilevelProblem`, how a problem is stated.
* :mod:`bilevel.fixed_point` -- the equilibrium engine and its strategies.
* :mod:`bilevel.relaxation` -- strategy + stopping rule bundled per phase.
* :mod:`bilevel.linear_solve` -- matrix-free adjoint solves.
* :mod:`bilevel.least_control` -- controllers and controlled fields (eqs. 6-15).
* :mod:`bilevel.train` -- the data-parallel training step.
"""

from bilevel.fixed_point import (Anderson, Euler, FixedPointResult, OptaxStrategy,
                                 RestartingNesterov, Status, make_strategy,
                                 solve_fixed_point, unrolled_fixed_point)
from bilevel.problem import BilevelProblem, ProblemError
from bilevel.relaxation import Relaxation

__all__ = [
    "Anderson", "BilevelProblem", "Euler", "FixedPointResult", "OptaxStrategy",
    "ProblemError", "Relaxation", "RestartingNesterov", "Status", "make_strategy",
    "solve_fixed_point", "unrolled_fixed_point",
]
