"""``rbp``: implicit gradient through the free equilibrium.

Eq. 5: ``grad_theta L = -d_theta f^T (d_phi f)^{-T} grad_phi L``. With
``w`` solving the adjoint system ``d_phi f(phi*)^T w = -grad_phi L(phi*)`` the
gradient is ``d_theta f^T w``: one matrix-free linear solve per example
(:mod:`bilevel.linear_solve`: adjoint dynamics, Neumann series or CG), then
one VJP over the batch. Memory does not grow with the number of iterations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from bilevel import linear_solve
from bilevel import tree as tu
from bilevel.relaxation import Relaxation
from bilevel.solver import Gradient, Solver

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RecurrentBackprop(Solver):
  """Two phases: free relaxation, then the linear adjoint relaxation."""
  name: ClassVar[str] = "rbp"

  adjoint_method: str = "fixed_point"
  adjoint: Relaxation = Relaxation(rtol=1e-6, max_steps=200)

  def init(self, problem, params, key):
    if self.adjoint_method not in linear_solve.METHODS:
      raise ValueError(f"unknown adjoint_method {self.adjoint_method!r}; use one of "
                       f"{linear_solve.METHODS}")
    if self.adjoint_method == "cg" and not problem.has_energy:
      raise ValueError(f"adjoint_method='cg' needs a symmetric Jacobian, i.e. a problem "
                       f"with an `energy`; {problem.name!r} has only dynamics. Use "
                       "adjoint_method='fixed_point'.")
    return super().init(problem, params, key)

  def gradient(self, problem, params, solver_params, batch, free, mask, key) -> Gradient:
    """Adjoint ``d_phi f^T w = -grad_phi L`` per example, then ``d_theta f^T w``."""
    matvec = lambda inputs: lambda w: problem.state_vjp(params, inputs[0], inputs[1], w)
    rhs = tu.tree_scale(-1.0, jax.vmap(problem.loss_grad)(free.value, batch))
    adj = linear_solve.solve_stable_linear_batch(matvec, (free.value, batch), rhs,
                                                 self.adjoint, method=self.adjoint_method)
    mask = mask.refine(adj)
    grads = mask.params_vjp(problem, params, free.value, batch, adj.value)
    return Gradient(grads, (), {"adjoint": adj}, {}, mask)
