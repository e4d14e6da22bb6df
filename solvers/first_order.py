"""First-order meta-learning heuristics: ``fomaml`` and ``reptile``.

Both need to know which part of ``theta`` the fast weights ``phi`` correspond
to. The requirement, checked when the solver is traced (and at ``init`` when
the problem carries an example): ``problem.init_state(params, example)`` must
return part of ``params`` unchanged -- the fast weights start at the slow
weights, ``phi_0 = omega``, so phi and omega have the same structure. For the
complex synapse (eq. 16) that is ``init_state = lambda theta, task: omega``,
with ``theta = omega`` or ``theta = {"omega": ..., other meta-parameters}``.
Directions computed on phi are mapped onto those params leaves; every other
meta-parameter (e.g. a learned lambda) gets a zero update.

* ``fomaml`` (Finn et al. 2017, first-order MAML): ``d phi* / d omega`` is
  replaced by the identity, so ``grad_omega = grad_phi L_eval(phi*)`` at the
  free equilibrium (the end of the inner loop).
* ``reptile`` (Nichol et al. 2018): ``grad_omega = (omega - phi_rho) /
  step_size``, with ``phi_rho`` the equilibrium of ``E + rho L`` started at
  ``omega``. ``rho = query_weight``: 0 adapts on the support set only
  (``phi_rho = phi*``); 1 adapts on all of the task's data (support and query
  loss), as Reptile fits every sampled example of a training task. Convention:
  an outer SGD step with learning rate ``eps`` on this direction is Reptile's
  ``omega <- omega + (eps / step_size) (phi - omega)``; for the complex synapse
  with ``rho = 0``, ``step_size = 1/lambda`` makes the direction ``lambda
  (omega - phi*) = grad L_learn(phi*)``, a gradient in the units of the others.
  With ``rho > 0`` the reported training loss/metrics are at ``phi_rho``, which
  has seen the query set (held-out scores come from ``Task.evaluate``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

from bilevel import tree as tu
from bilevel.problem import BilevelProblem
from solvers.base import GradientEstimate, Solver, relaxation_stats
from solvers.cml import nudged_equilibria

PyTree = Any


def _first(batch: PyTree) -> PyTree:
  return jax.tree.map(lambda a: a[0], batch)


def fast_weight_embedding(problem: BilevelProblem, params: PyTree, example: PyTree,
                          solver_name: str) -> Callable[[PyTree], PyTree]:
  """``embed(v) -> params-shaped tree``: phi-shaped ``v`` placed on the params
  leaves that ``init_state`` copies (omega), zeros elsewhere.

  Raises ValueError (before anything is compiled) unless ``init_state`` returns
  distinct leaves of ``params`` unchanged.
  """
  leaves, treedef = jax.tree.flatten(params)

  def start(*flat):
    return problem.init_state(jax.tree.unflatten(treedef, list(flat)), example)

  closed = jax.make_jaxpr(start)(*leaves)
  invars = list(closed.jaxpr.invars)
  index = []
  for out in closed.jaxpr.outvars:
    hit = [i for i, v in enumerate(invars) if v is out]
    index.append(hit[0] if hit else None)
  if not index or None in index or len(set(index)) != len(index):
    raise ValueError(
        f"solver {solver_name!r} needs the fast weights to start at the slow weights: "
        f"{problem.name!r}.init_state(params, example) must return (part of) params "
        "unchanged, so that phi and omega have the same structure (for a complex "
        "synapse: init_state=lambda theta, task: theta, or theta['omega']). Use a "
        "solver that needs no such map ('lcp', 'imaml', 'rbp', 'cml', 't1t2', 'bp').")

  def embed(v: PyTree) -> PyTree:
    flat = [jnp.zeros_like(x) for x in leaves]
    for j, x in zip(index, jax.tree.leaves(v)):
      flat[j] = x.astype(leaves[j].dtype)
    return jax.tree.unflatten(treedef, flat)

  return embed


@dataclasses.dataclass(frozen=True)
class _FastWeightSolver(Solver):
  """Checks the phi <-> omega correspondence at init when an example is known."""

  def init(self, problem, params, key):
    if problem.example is not None:
      fast_weight_embedding(problem, params, problem.example, self.name)
    return super().init(problem, params, key)


@dataclasses.dataclass(frozen=True)
class FirstOrderMAML(_FastWeightSolver):
  """``fomaml``: ``grad_omega = grad_phi L(phi*)`` (d phi*/d omega ~ identity)."""
  name: ClassVar[str] = "fomaml"

  def __call__(self, problem, params, solver_params, batch) -> GradientEstimate:
    embed = fast_weight_embedding(problem, params, _first(batch), self.name)
    free = self.free_equilibrium(problem, params, batch)
    direction = tu.tree_mean_over_batch(jax.vmap(problem.loss_grad)(free.value, batch))
    loss, outputs = self.batch_loss(problem, free.value, batch)
    return GradientEstimate(embed(direction), (), loss, outputs,
                            relaxation_stats("free", free))


@dataclasses.dataclass(frozen=True)
class Reptile(_FastWeightSolver):
  """``reptile``: ``grad_omega = (omega - phi_rho) / step_size`` (module docstring)."""
  name: ClassVar[str] = "reptile"
  query_weight: float = 0.0
  step_size: float = 1.0

  def init(self, problem, params, key):
    if not self.step_size > 0 or self.query_weight < 0:
      raise ValueError(f"reptile needs step_size > 0 and query_weight >= 0, got "
                       f"{self.step_size}, {self.query_weight}")
    return super().init(problem, params, key)

  def __call__(self, problem, params, solver_params, batch) -> GradientEstimate:
    embed = fast_weight_embedding(problem, params, _first(batch), self.name)
    starts = jax.vmap(problem.init_state, in_axes=(None, 0))(params, batch)
    if self.query_weight:
      res = nudged_equilibria(problem, params, batch, self.query_weight, self.free, starts)
    else:
      res = self.free_equilibrium(problem, params, batch)
    direction = tu.tree_mean_over_batch(tu.tree_sub(starts, res.value))
    loss, outputs = self.batch_loss(problem, res.value, batch)
    return GradientEstimate(embed(tu.tree_scale(1.0 / self.step_size, direction)), (),
                            loss, outputs, relaxation_stats("free", res))
