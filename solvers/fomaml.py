"""``fomaml``: first-order MAML (Finn et al. 2017).

``d phi* / d omega`` is replaced by the identity, so ``grad_omega = grad_phi
L_eval(phi*)`` at the free equilibrium (the end of the inner loop). Needs the
fast weights to start at the slow weights, ``phi_0 = omega``
(``problem.init_state(params, example)`` returns part of ``params`` unchanged),
checked when the solver is traced and at ``init`` when the problem carries an
example. For the complex synapse (eq. 16) that is ``init_state = lambda theta,
task: omega``, with ``theta = omega`` or ``theta = {"omega": ..., other
meta-parameters}``. Directions computed on phi are mapped onto those params
leaves; every other meta-parameter (e.g. a learned lambda) gets a zero update.
:func:`fast_weight_embedding` is shared with ``reptile``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

from bilevel.problem import BilevelProblem
from bilevel.solver import Gradient, Solver

PyTree = Any


def first_example(batch: PyTree) -> PyTree:
  """The first example of a batch (abstractly enough for tracing the map)."""
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
class FastWeightSolver(Solver):
  """Checks the phi <-> omega correspondence at init when an example is known."""

  def init(self, problem, params, key):
    if problem.example is not None:
      fast_weight_embedding(problem, params, problem.example, self.name)
    return super().init(problem, params, key)


@dataclasses.dataclass(frozen=True)
class FirstOrderMAML(FastWeightSolver):
  """``fomaml``: ``grad_omega = grad_phi L(phi*)`` (d phi*/d omega ~ identity)."""
  name: ClassVar[str] = "fomaml"

  def gradient(self, problem, params, solver_params, batch, free, mask, key) -> Gradient:
    """The mean output error at phi*, placed on omega."""
    embed = fast_weight_embedding(problem, params, first_example(batch), self.name)
    direction = mask.mean(jax.vmap(problem.loss_grad)(free.value, batch))
    return Gradient(embed(direction), (), {}, {}, mask)
