"""``t1t2``: the one-step hypergradient of Luketina et al. (2016).

T1-T2 updates hyperparameters with the gradient of the held-out (T2) loss
through the LAST elementary update only, earlier updates being treated as
constants. With the inner loop's last step ``phi_K = phi_{K-1} + eta f(phi_{K-1},
theta)`` that is

    grad_theta = eta d_theta f(phi*, theta)^T grad_phi L(phi*)

evaluated at the end of the free relaxation (``phi_{K-1} ~ phi_K = phi*``).
Equivalently: recurrent backprop (eq. 5) whose adjoint ``(-d_phi f)^{-T} grad
L`` is truncated to the first term ``eta grad L`` of its Neumann series. It is
stated through ``d_theta f`` only, so it works on every problem (and gives a
gradient to every meta-parameter, e.g. a learned per-synapse lambda, where
``d_lambda f = -(phi - omega)``). For the complex synapse (eq. 16)
``d_omega f = lambda I`` and ``grad_omega = eta lambda grad L_eval(phi*)``: the
FOMAML direction scaled by ``eta lambda``. ``step_size`` is ``eta``, the inner
learning rate (with heavy-ball momentum ``mu`` the effective step is
``eta / (1 - mu)``; for Adam in the outer loop only its ratio to other
meta-parameters' updates matters).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from bilevel import tree as tu
from bilevel.solver import Gradient, Solver


@dataclasses.dataclass(frozen=True)
class T1T2(Solver):
  """``t1t2``: ``eta d_theta f(phi*)^T grad_phi L(phi*)`` at the free equilibrium."""
  name: ClassVar[str] = "t1t2"
  step_size: float = 1.0

  def init(self, problem, params, key):
    if not self.step_size > 0:
      raise ValueError(f"t1t2 needs step_size > 0 (the inner learning rate), got "
                       f"{self.step_size}")
    return super().init(problem, params, key)

  def gradient(self, problem, params, solver_params, batch, free, mask, key) -> Gradient:
    """One VJP with the scaled output error as cotangent."""
    cot = tu.tree_scale(self.step_size, jax.vmap(problem.loss_grad)(free.value, batch))
    grads = mask.params_vjp(problem, params, free.value, batch, cot)
    return Gradient(grads, (), {}, {}, mask)
