"""Least-control mechanics shared by every LCP circuit (section 2 of the paper).

* :class:`OutputController` -- the leaky integral controller of eq. 6,
  ``du/dt = k_i (-grad_y L(y) - alpha u)``, with an optional proportional term
  so that the control fed to the system is ``u - k_p grad_y L``. At a steady
  state ``alpha u* + grad_y L(y*) = 0`` (the condition of section 2.2).
* Three controlled fields on a joint state, each an ``F(z)`` for the
  equilibrium engine:

  - :func:`dynamic_inversion_field` (eq. 8): z = (phi, psi, u),
    ``dphi = f + psi``, ``dpsi = d_phi f^T psi + P^T u_c`` (eq. 14 for RNNs);
  - :func:`energy_based_field` (eq. 10 with output control, eq. 15):
    z = (phi, u), ``dphi = d_phi f^T psi + P^T u_c`` with ``psi = -f``;
  - :func:`direct_field` (eq. 13 with ``Q`` given, eq. 17 with ``Q = P^T``):
    z = (phi, u), ``dphi = f + Q u_c``.

  At steady state all three satisfy ``f(phi*) + psi* = 0`` (eq. 3). DI and EBD
  reach the same point: it is the stationary point of the augmented energy
  ``F(phi) = 1/2 ||f||^2 + L / alpha`` (section 2.4 with beta = 1 / alpha), so
  their update is the exact gradient of ``min_phi F`` and tends to grad H as
  alpha -> 0.
* :func:`least_control_update` -- Theorem 1 (eq. 4): ``grad_theta H = -d_theta
  f(phi*, theta)^T psi*``, as one VJP over the batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax

from bilevel import tree as tu
from bilevel.problem import BilevelProblem

PyTree = Any


@dataclasses.dataclass(frozen=True)
class OutputController:
  """Leaky integral (+ proportional) output controller, eq. 6."""
  alpha: float = 0.1
  k_i: float = 1.0
  k_p: float = 0.0

  def __call__(self, problem: BilevelProblem, state: PyTree, u: PyTree,
               example: PyTree) -> tuple[PyTree, PyTree]:
    """Returns (du/dt, control u_c applied to the output units)."""
    error = problem.output_error(state, example)
    du = tu.tree_scale(self.k_i, tu.tree_axpy(-self.alpha, u, tu.tree_scale(-1.0, error)))
    control = tu.tree_axpy(-self.k_p, error, u) if self.k_p else u
    return du, control


class DIState(NamedTuple):
  phi: PyTree
  psi: PyTree
  u: PyTree


class OutputControlledState(NamedTuple):
  phi: PyTree
  u: PyTree


def dynamic_inversion_field(problem: BilevelProblem, params: PyTree, example: PyTree,
                            controller: OutputController, *,
                            feedback_params: Optional[PyTree] = None,
                            tau_psi: float = 1.0) -> Callable[[DIState], DIState]:
  """Eq. 8 with the controller of eq. 6 (eq. 14 for equilibrium RNNs).

  ``feedback_params`` replaces ``params`` inside ``d_phi f^T psi`` only: with
  Kolen-Pollack-learned feedback weights the backward pathway carries its own
  weights (S in eq. 14) instead of transporting the forward ones.
  """
  back_params = params if feedback_params is None else feedback_params

  def field(z: DIState) -> DIState:
    du, control = controller(problem, z.phi, z.u, example)
    dphi = tu.tree_add(problem.f(params, z.phi, example), z.psi)
    back = problem.state_vjp(back_params, z.phi, example, z.psi)
    dpsi = tu.tree_scale(1.0 / tau_psi,
                         tu.tree_add(back, problem.output_adjoint(z.phi, control)))
    return DIState(dphi, dpsi, du)

  return field


def energy_based_field(problem: BilevelProblem, params: PyTree, example: PyTree,
                       controller: OutputController
                       ) -> Callable[[OutputControlledState], OutputControlledState]:
  """Gradient flow on ``1/2 ||f||^2`` plus output control (eqs. 10, 15)."""

  def field(z: OutputControlledState) -> OutputControlledState:
    du, control = controller(problem, z.phi, z.u, example)
    f_val, vjp = jax.vjp(lambda s: problem.f(params, s, example), z.phi)
    dphi = tu.tree_add(vjp(tu.tree_scale(-1.0, f_val))[0],
                       problem.output_adjoint(z.phi, control))
    return OutputControlledState(dphi, du)

  return field


def direct_field(problem: BilevelProblem, params: PyTree, example: PyTree,
                 controller: OutputController,
                 feedback: Optional[Callable[[PyTree, PyTree], PyTree]] = None
                 ) -> Callable[[OutputControlledState], OutputControlledState]:
  """``dphi = f + Q u_c`` (eqs. 13, 17); ``Q = P^T`` (direct output control)
  unless ``feedback(phi, u_c) -> Q u_c`` is given (e.g. learned linear feedback)."""
  feedback = feedback or problem.output_adjoint

  def field(z: OutputControlledState) -> OutputControlledState:
    du, control = controller(problem, z.phi, z.u, example)
    dphi = tu.tree_add(problem.f(params, z.phi, example), feedback(z.phi, control))
    return OutputControlledState(dphi, du)

  return field


def least_control_update(problem: BilevelProblem, params: PyTree, states: PyTree,
                         controls: PyTree, batch: PyTree) -> PyTree:
  """Theorem 1, eq. 4: ``grad_theta H = -(1/B) sum_i d_theta f(phi_i*)^T psi_i*``."""
  return problem.params_vjp(params, states, batch, tu.tree_scale(-1.0, controls))
