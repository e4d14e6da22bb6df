"""``lcp_kp``: dynamic inversion (eq. 8) with feedback weights learned by Kolen-Pollack.

The feedback copy B (same pytree as params) replaces params in the backward
pathway ``d_phi f(phi, B)^T psi``. B receives the same local update as the
forward weights (for eq. 11, ``dS = sigma(phi*) psi*^T`` is the transpose of
eq. 12's ``dW``) and both decay by ``weight_decay``, so ``B - theta`` shrinks
and the feedback aligns without weight transport.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from bilevel import tree as tu
from solvers.lcp_di import DynamicInversion

PyTree = Any


@dataclasses.dataclass(frozen=True)
class KolenPollack(DynamicInversion):
  """``lcp_kp``: DI whose backward pathway carries learned weights B."""
  name: ClassVar[str] = "lcp_kp"
  weight_decay: float = 1e-6
  # "random", "copy" (start aligned, B = theta) or "unit_norm" (the paper
  # authors': every feedback matrix random with unit Frobenius norm).
  feedback_init: str = "random"
  init_scale: float = 1.0

  def init(self, problem, params, key):
    super().init(problem, params, key)
    if self.feedback_init == "copy":
      return jax.tree.map(jnp.array, params)
    if self.feedback_init == "unit_norm":
      return unit_norm_like(params, key)
    if self.feedback_init != "random":
      raise ValueError(f"feedback_init must be 'random', 'copy' or 'unit_norm', got "
                       f"{self.feedback_init!r}")
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


def unit_norm_like(params: PyTree, key: jax.Array) -> PyTree:
  """Random matrices with unit Frobenius norm in the shape of every matrix leaf
  of ``params`` (zeros for vectors): the paper authors' Kolen-Pollack feedback
  initialisation (their feedback layers are divided by their norm)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))

  def one(k, x):
    if x.ndim < 2:
      return jnp.zeros_like(x)
    w = jax.random.normal(k, x.shape, x.dtype)
    return w / jnp.linalg.norm(w)

  return jax.tree.unflatten(treedef, [one(k, x) for k, x in zip(keys, leaves)])
