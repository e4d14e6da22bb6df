"""The meta-gradient solver interface shared by every solver.

A solver is a frozen dataclass of options (gains, tolerances, relaxations)
with two methods:

* ``init(problem, params, key) -> solver_params`` -- learned state of the solver
  itself (feedback weights for Kolen-Pollack or linear feedback; ``()`` if
  none). The training loop optimises and checkpoints it next to ``params``.
* ``__call__(problem, params, solver_params, batch) -> GradientEstimate`` -- the
  update direction for ``params`` (a gradient to descend) and for
  ``solver_params``, averaged over the batch, plus per-example diagnostics.

Solvers never know which problem they solve: they use only the methods of
:class:`bilevel.problem.BilevelProblem`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from bilevel.fixed_point import FixedPointResult
from bilevel.problem import BilevelProblem
from bilevel.relaxation import Relaxation

PyTree = Any


class GradientEstimate(NamedTuple):
  """What every solver returns for a batch.

  grads: pytree like params, the direction to descend (batch mean).
  solver_grads: pytree like solver_params (``()`` if the solver has none).
  loss: scalar, mean outer loss L at the (free) equilibrium the solver reached.
  outputs: per-example outputs y at that equilibrium, leading batch axis.
  stats: dict of per-example diagnostics (leading batch axis): iterations,
    residuals, converged flags and status codes of every relaxation, and
    solver-specific quantities such as ``psi_norm``.
  """
  grads: PyTree
  solver_grads: PyTree
  loss: jax.Array
  outputs: PyTree
  stats: dict


def relaxation_stats(prefix: str, result: FixedPointResult) -> dict:
  """Per-example diagnostics of a (vmapped) relaxation, keyed ``prefix/...``."""
  return {f"{prefix}/iterations": result.iterations,
          f"{prefix}/residual": result.residual,
          f"{prefix}/relative_residual": result.relative_residual,
          f"{prefix}/converged": result.converged,
          f"{prefix}/status": result.status}


@dataclasses.dataclass(frozen=True)
class Solver:
  """Base class: holds the free-phase relaxation and shared plumbing."""
  name: ClassVar[str] = "solver"
  needs_energy: ClassVar[bool] = False

  free: Relaxation = Relaxation()

  def init(self, problem: BilevelProblem, params: PyTree, key: jax.Array) -> PyTree:
    """Learned solver state; checks the problem suits the solver."""
    if self.needs_energy and not problem.has_energy:
      raise ValueError(f"solver {self.name!r} needs a problem stated with an inner "
                       f"`energy`; {problem.name!r} gives only `dynamics`. Use "
                       "another solver (e.g. 'rbp' or 'lcp_di') or give an energy.")
    return ()

  def __call__(self, problem: BilevelProblem, params: PyTree, solver_params: PyTree,
               batch: PyTree) -> GradientEstimate:
    raise NotImplementedError

  # ----- shared mechanics ---------------------------------------------------

  def free_equilibrium(self, problem: BilevelProblem, params: PyTree,
                       batch: PyTree) -> FixedPointResult:
    """phi* with f(phi*, theta) = 0 for every example (vmapped relaxation)."""

    def one(example):
      field = lambda s: problem.f(params, s, example)
      return self.free.solve(field, problem.init_state(params, example))

    return jax.vmap(one)(batch)

  @staticmethod
  def batch_loss(problem: BilevelProblem, states: PyTree, batch: PyTree):
    """(mean outer loss, per-example outputs) at per-example states."""
    losses = jax.vmap(problem.outer_loss)(states, batch)
    return jnp.mean(losses), jax.vmap(problem.output)(states)
