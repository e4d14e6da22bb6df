"""``cml``: contrastive meta-learning / equilibrium propagation on any energy problem.

Zucchet et al. (2022), "A contrastive rule for meta-learning" (ref. [35] of the
paper). For a problem with an inner energy ``E(theta, phi)`` (``f = -grad_phi
E``), the nudged equilibria

    phi_beta = argmin_phi E(theta, phi) + beta L(phi)

satisfy ``d/dbeta [d_theta E(theta, phi_beta)] = d L(phi*) / d theta`` at
``beta = 0``, so the symmetric finite difference

    grad = [d_theta E(theta, phi_{+beta}) - d_theta E(theta, phi_{-beta})] / (2 beta)

is the meta-gradient up to ``O(beta^2)`` (one-sided ``[d_theta E(phi_beta) -
d_theta E(phi*)] / beta`` is ``O(beta)``, ``symmetric=False``). Both nudged
phases start from the free equilibrium ``phi*`` with a fresh strategy state
(the CML authors reset the inner optimiser per phase). Nothing here is specific
to meta-learning: it works on every problem stated with an ``energy``. For the
complex synapse (eq. 16) ``d_omega E = lambda (omega - phi)`` and the rule is
``grad_omega = lambda (phi_{-beta} - phi_{+beta}) / (2 beta)``.

:func:`nudged_equilibria` (relaxation of ``E + beta L``) is shared with
``reptile`` (:mod:`solvers.reptile`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from bilevel import tree as tu
from bilevel.fixed_point import FixedPointResult
from bilevel.problem import BilevelProblem
from bilevel.relaxation import Relaxation
from bilevel.solver import BatchMask, Gradient, Solver

PyTree = Any


def nudged_field(problem: BilevelProblem, params: PyTree, example: PyTree, beta: float):
  """``F(phi) = f(phi) - beta grad_phi L(phi)``, i.e. ``-grad_phi (E + beta L)``."""
  return lambda s: tu.tree_axpy(-beta, problem.loss_grad(s, example),
                                problem.f(params, s, example))


def nudged_equilibria(problem: BilevelProblem, params: PyTree, batch: PyTree, beta: float,
                      relaxation: Relaxation, starts: PyTree) -> FixedPointResult:
  """Per-example equilibria of ``E + beta L`` from ``starts`` (leading batch axis)."""
  return relaxation.solve_batch(lambda example: nudged_field(problem, params, example, beta),
                                batch, starts)


def energy_contrast_grad(problem: BilevelProblem, params: PyTree, high: PyTree, low: PyTree,
                         batch: PyTree, mask: BatchMask) -> PyTree:
  """``(1/B) sum_valid [d_theta E(theta, high_i) - d_theta E(theta, low_i)]``, one VJP."""
  energies = jax.vmap(problem.energy, in_axes=(None, 0, 0))
  high, low, batch = mask.substitute((high, low, batch))

  def contrast(p):
    return mask.mean(energies(p, high, batch) - energies(p, low, batch))

  return jax.grad(contrast)(params)


@dataclasses.dataclass(frozen=True)
class ContrastiveMetaLearning(Solver):
  """``cml``: free phase, then nudged phases at ``+beta`` (and ``-beta``).

  Defaults are the CML authors' Omniglot 20-way 1-shot recipe (beta = 0.03,
  symmetric, 100 steps per nudged phase).
  """
  name: ClassVar[str] = "cml"
  needs_energy: ClassVar[bool] = True

  beta: float = 0.03
  symmetric: bool = True
  nudged: Relaxation = Relaxation(rtol=1e-5, max_steps=100)

  def init(self, problem, params, key):
    if not self.beta > 0:
      raise ValueError(f"cml needs beta > 0 (the nudging strength), got {self.beta}")
    return super().init(problem, params, key)

  def gradient(self, problem, params, solver_params, batch, free, mask, key) -> Gradient:
    """Nudged phases from phi*, then the energy contrast over 2 beta (or beta)."""
    plus = nudged_equilibria(problem, params, batch, self.beta, self.nudged, free.value)
    phases, mask = {"nudged_plus": plus}, mask.refine(plus)
    if self.symmetric:
      minus = nudged_equilibria(problem, params, batch, -self.beta, self.nudged, free.value)
      phases["nudged_minus"], mask = minus, mask.refine(minus)
      low, scale = minus.value, 2.0 * self.beta
    else:
      low, scale = free.value, self.beta
    grads = tu.tree_scale(1.0 / scale,
                          energy_contrast_grad(problem, params, plus.value, low, batch, mask))
    return Gradient(grads, (), phases, {}, mask)
