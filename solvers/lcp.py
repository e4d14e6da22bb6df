"""Least-control solvers: one relaxation to a controlled equilibrium, one VJP.

All circuits share the same flow (free equilibrium -> controlled equilibrium
started there -> local update of Theorem 1); they differ only in the controlled
field and in where the control psi* is read. The fields live in
:mod:`bilevel.least_control`.

* ``lcp_di``     -- dynamic inversion, eq. 8 (eq. 14 for RNNs).
* ``lcp_kp``     -- dynamic inversion whose backward pathway uses learned
  feedback weights, trained by Kolen-Pollack (``dS = sigma(phi) psi^T - gamma
  S``, i.e. the transposed forward update plus decay on both).
* ``lcp_ebd``    -- energy-based dynamics, eq. 10 / 15.
* ``lcp_direct`` -- direct output control, Q = identity on the outputs
  (eq. 17; with all of phi as output this is the meta-learning rule, eq. 18).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from bilevel import fixed_point as fp
from bilevel import least_control as lc
from bilevel import tree as tu
from bilevel.problem import BilevelProblem
from bilevel.relaxation import Relaxation
from solvers.base import GradientEstimate, Solver, relaxation_stats

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LeastControl(Solver):
  """Shared flow of the LCP circuits. Defaults from the paper authors' MNIST runs."""
  name: ClassVar[str] = "lcp"

  alpha: float = 0.1
  k_i: float = 1.0
  k_p: float = 0.0
  # The joint controlled dynamics are stable but lightly damped; forward Euler
  # at dt = 1 can oscillate or blow up, Anderson acceleration settles them.
  controlled: Relaxation = Relaxation(strategy=fp.Anderson(dt=0.5, memory=8), rtol=1e-6,
                                      max_steps=800)

  def __post_init__(self):
    if self.alpha < 0 or self.k_i <= 0 or self.k_p < 0:
      raise ValueError(f"{self.name}: need alpha >= 0, k_i > 0 and k_p >= 0; got "
                       f"alpha={self.alpha}, k_i={self.k_i}, k_p={self.k_p}")

  @property
  def controller(self) -> lc.OutputController:
    return lc.OutputController(self.alpha, self.k_i, self.k_p)

  # ----- per-circuit hooks ----------------------------------------------------

  def initial_state(self, problem: BilevelProblem, phi: PyTree, example: PyTree):
    return lc.OutputControlledState(phi, tu.tree_zeros_like(problem.output(phi)))

  def field(self, problem, params, solver_params, example):
    raise NotImplementedError

  def control(self, problem, params, solver_params, z, example) -> PyTree:
    """psi* read from the controlled steady state z."""
    raise NotImplementedError

  def extra_gradients(self, params, solver_params, grads):
    """(grads for params, grads for solver_params) from the local update."""
    return grads, ()

  # ----- shared flow ----------------------------------------------------------

  def __call__(self, problem: BilevelProblem, params: PyTree, solver_params: PyTree,
               batch: PyTree) -> GradientEstimate:
    free = self.free_equilibrium(problem, params, batch)

    def controlled_equilibrium(phi, example):
      z0 = self.initial_state(problem, phi, example)
      res = self.controlled.solve(
          self.field(problem, params, solver_params, example), z0)
      psi = self.control(problem, params, solver_params, res.value, example)
      # Eq. 3's first constraint, f(phi*) + psi* = 0, as a diagnostic.
      violation = tu.tree_norm(tu.tree_add(problem.f(params, res.value.phi, example), psi))
      return res, psi, violation

    res, psi, violation = jax.vmap(controlled_equilibrium)(free.value, batch)
    update = lc.least_control_update(problem, params, res.value.phi, psi, batch)
    grads, solver_grads = self.extra_gradients(params, solver_params, update)
    loss, outputs = self.batch_loss(problem, free.value, batch)
    psi_norm = jax.vmap(tu.tree_norm)(psi)
    stats = {**relaxation_stats("free", free), **relaxation_stats("controlled", res),
             "psi_norm": psi_norm, "constraint_violation": violation,
             "controlled_loss": jax.vmap(problem.outer_loss)(res.value.phi, batch)}
    return GradientEstimate(grads, solver_grads, loss, outputs, stats)


@dataclasses.dataclass(frozen=True)
class DynamicInversion(LeastControl):
  """``lcp_di``: eq. 8 -- psi relaxes on ``d_phi f^T psi + P^T u``."""
  name: ClassVar[str] = "lcp_di"
  tau_psi: float = 1.0

  def initial_state(self, problem, phi, example):
    z = super().initial_state(problem, phi, example)
    return lc.DIState(phi, tu.tree_zeros_like(phi), z.u)

  def feedback_params(self, params, solver_params):
    return None

  def field(self, problem, params, solver_params, example):
    return lc.dynamic_inversion_field(
        problem, params, example, self.controller,
        feedback_params=self.feedback_params(params, solver_params),
        tau_psi=self.tau_psi)

  def control(self, problem, params, solver_params, z, example):
    return z.psi


@dataclasses.dataclass(frozen=True)
class KolenPollack(DynamicInversion):
  """``lcp_kp``: dynamic inversion with feedback weights learned by Kolen-Pollack.

  The feedback copy B (same pytree as params) replaces params in the backward
  pathway ``d_phi f(phi, B)^T psi``. B receives the same local update as the
  forward weights (for eq. 11, ``dS = sigma(phi*) psi*^T`` is the transpose of
  eq. 12's ``dW``) and both decay by ``weight_decay``, so ``B - theta`` shrinks
  and the feedback aligns without weight transport.
  """
  name: ClassVar[str] = "lcp_kp"
  weight_decay: float = 1e-6
  feedback_init: str = "random"  # or "copy": start aligned (B = theta)
  init_scale: float = 1.0

  def init(self, problem, params, key):
    super().init(problem, params, key)
    if self.feedback_init == "copy":
      return jax.tree.map(jnp.array, params)
    if self.feedback_init != "random":
      raise ValueError(f"feedback_init must be 'random' or 'copy', got {self.feedback_init!r}")
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    # Independent random feedback of the same scale as each forward leaf.
    fresh = [self.init_scale * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
             if x.ndim > 1 else jnp.zeros_like(x) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, fresh)

  def feedback_params(self, params, solver_params):
    return solver_params

  def extra_gradients(self, params, solver_params, grads):
    decayed = lambda w: tu.tree_axpy(self.weight_decay, w, grads)
    return decayed(params), decayed(solver_params)


@dataclasses.dataclass(frozen=True)
class EnergyBased(LeastControl):
  """``lcp_ebd``: gradient flow on 1/2||f||^2 plus output control; psi* = -f(phi*)."""
  name: ClassVar[str] = "lcp_ebd"

  def field(self, problem, params, solver_params, example):
    return lc.energy_based_field(problem, params, example, self.controller)

  def control(self, problem, params, solver_params, z, example):
    return tu.tree_scale(-1.0, problem.f(params, z.phi, example))


@dataclasses.dataclass(frozen=True)
class DirectControl(LeastControl):
  """``lcp_direct``: ``dphi = f + P^T u`` (eq. 17); psi* = P^T u_c*.

  With all of phi as output (meta-learning, eq. 16) and f = -grad L_learn -
  lambda (phi - omega), the update is ``d omega = lambda u*`` (eq. 18).
  """
  name: ClassVar[str] = "lcp_direct"

  def field(self, problem, params, solver_params, example):
    return lc.direct_field(problem, params, example, self.controller)

  def control(self, problem, params, solver_params, z, example):
    _, control = self.controller(problem, z.phi, z.u, example)
    return problem.output_adjoint(z.phi, control)
