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
* :class:`LeastControl` -- the solver flow every LCP circuit shares (free
  equilibrium -> controlled equilibrium started there -> Theorem 1's update).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import jax

from bilevel import controlled_solve as cs
from bilevel import fixed_point as fp
from bilevel import tree as tu
from bilevel.problem import BilevelProblem
from bilevel.relaxation import Relaxation
from bilevel.solver import Gradient, Solver

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

  def steady_state(self, problem: BilevelProblem, state: PyTree, example: PyTree) -> PyTree:
    """``u*`` with ``du/dt = 0`` at ``state``: ``-grad_y L / alpha`` (needs alpha > 0)."""
    return tu.tree_scale(-1.0 / self.alpha, problem.output_error(state, example))


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


@dataclasses.dataclass(frozen=True)
class LeastControl(Solver):
  """Shared flow of the LCP circuits (free -> controlled -> Theorem 1 update).

  A circuit gives :meth:`field` (its controlled dynamics) and :meth:`control`
  (where psi* is read); :meth:`signal` and :meth:`extra_gradients` let a
  circuit change the update. Defaults from the paper authors' MNIST runs.
  """
  name: ClassVar[str] = "lcp"

  alpha: float = 0.1
  k_i: float = 1.0
  k_p: float = 0.0
  # The joint controlled dynamics are stable but lightly damped; forward Euler
  # at dt = 1 can oscillate or blow up, Anderson acceleration settles them.
  controlled: Relaxation = Relaxation(strategy=fp.Anderson(dt=0.5, memory=8), rtol=1e-6,
                                      max_steps=800)
  # How the controlled steady state is found: "relaxation" integrates the
  # dynamics with `controlled`; "newton" (or {"method": "newton", ...}) solves
  # F(z) = 0 for the same steady state, to `controlled`'s tolerance and budget;
  # "reduced" relaxes with u held at the controller's steady state u*(phi)
  # (bilevel/controlled_solve.py).
  controlled_solve: Any = "relaxation"
  # Where the controlled phase starts: "free" (the free equilibrium) or "zeros"
  # (problem.init_state, as in the paper authors' code).
  controlled_start: str = "free"

  def __post_init__(self):
    # A hashable route object (solvers are jit/lru_cache keys).
    object.__setattr__(self, "controlled_solve",
                       cs.make_route(self.controlled_solve) or "relaxation")
    if self.controlled_start not in ("free", "zeros"):
      raise ValueError(f"controlled_start must be 'free' or 'zeros', got "
                       f"{self.controlled_start!r}")
    if isinstance(self.controlled_solve, cs.Reduced) and self.alpha <= 0:
      raise ValueError(f"{self.name}: controlled_solve='reduced' pins u at its steady "
                       f"state -grad L / alpha and needs alpha > 0; got alpha={self.alpha} "
                       "(use controlled_solve='relaxation' for alpha = 0)")
    if self.alpha < 0 or self.k_i <= 0 or self.k_p < 0:
      raise ValueError(f"{self.name}: need alpha >= 0, k_i > 0 and k_p >= 0; got "
                       f"alpha={self.alpha}, k_i={self.k_i}, k_p={self.k_p}")

  @property
  def controller(self) -> OutputController:
    return OutputController(self.alpha, self.k_i, self.k_p)

  def initial_state(self, problem: BilevelProblem, phi: PyTree, example: PyTree):
    return OutputControlledState(phi, tu.tree_zeros_like(problem.output(phi)))

  def field(self, problem, params, solver_params, example):
    raise NotImplementedError

  def control(self, problem, params, solver_params, z, example) -> PyTree:
    """psi* read from the controlled steady state z."""
    raise NotImplementedError

  def signal(self, problem, phi_star: PyTree, psi: PyTree) -> PyTree:
    """The per-example cotangent of the update (psi* for Theorem 1)."""
    return psi

  def extra_gradients(self, params, solver_params, grads):
    """(grads for params, grads for solver_params) from the local update."""
    return grads, ()

  def learn(self, problem, params, solver_params, batch, res, mask, key):
    """(solver_grads or None, extras) from the controlled steady states."""
    return None, {}

  def controlled_equilibria(self, problem, params, solver_params, phis, batch):
    """Per-example controlled equilibria, psi* and ||f(phi*) + psi*|| (eq. 3)."""

    def start(phi, example):
      if self.controlled_start == "zeros":
        phi = problem.init_state(params, example)
      return self.initial_state(problem, phi, example)

    def read(z, example):
      psi = self.control(problem, params, solver_params, z, example)
      return psi, tu.tree_norm(tu.tree_add(problem.f(params, z.phi, example), psi))

    pin = lambda example: lambda z: z._replace(
        u=self.controller.steady_state(problem, z.phi, example))
    res = cs.solve_controlled(cs.make_route(self.controlled_solve), self.controlled,
                              lambda example: self.field(problem, params, solver_params,
                                                         example),
                              pin, batch, jax.vmap(start)(phis, batch))
    psi, violation = jax.vmap(read)(res.value, batch)
    return res, psi, violation

  def gradient(self, problem, params, solver_params, batch, free, mask, key) -> Gradient:
    """Theorem 1 (eq. 4) at the controlled equilibrium started at phi*."""
    res, psi, violation = self.controlled_equilibria(problem, params, solver_params,
                                                     free.value, batch)
    mask = mask.refine(res, self.controlled)
    signal = self.signal(problem, res.value.phi, psi)
    update = mask.params_vjp(problem, params, res.value.phi, batch,
                             tu.tree_scale(-1.0, signal))
    grads, solver_grads = self.extra_gradients(params, solver_params, update)
    learned, extras = self.learn(problem, params, solver_params, batch, res, mask, key)
    if learned is not None:
      solver_grads = learned
    extras.update({"psi_norm": jax.vmap(tu.tree_norm)(psi), "constraint_violation": violation,
                   "controlled_loss": jax.vmap(problem.outer_loss)(res.value.phi, batch)})
    return Gradient(grads, solver_grads, {"controlled": res}, extras, mask)
