"""Equilibrium engine: find z* with F(z*) = 0 for a vector field F on a pytree.

Every equilibrium in the library -- free equilibria (eq. 1), controlled
equilibria (eqs. 6, 8, 10, 13-15, 17) and the linear adjoint of recurrent
backprop (eq. 5) -- is found here. The field F is the right-hand side of
``dz/dt = F(z)``; an iteration *strategy* (optimistix-style ``init`` / ``step``
object, passed by argument) turns it into a discrete update:

* :class:`Euler` -- forward Euler ``z <- z + dt F(z)`` (damped Picard iteration
  of the map ``z + F(z)``; ``dt`` is the damping),
* :class:`Anderson` -- Anderson acceleration (type II) of that Euler map,
* :class:`OptaxStrategy` -- any optax transformation fed ``-F(z)`` as gradient
  (heavy-ball SGD for inner learning loops, Adam on states for the
  energy-based circuit).

The loop is a ``lax.while_loop`` that stops when ``||F(z)|| <= atol + rtol ||z||``,
``max_steps`` is reached or ``F`` stops being finite. It never raises: the
outcome is reported in :class:`FixedPointResult` (iterations, residual, status).
The engine is written for one example; ``jax.vmap`` over it gives per-example
stopping (an example that converged is frozen while the others continue), and a
diverging example only marks its own status.

``steps_per_check`` runs several strategy steps (unrolled in Python) per
while-loop iteration. On CPU, convolutions inside a while-loop body run several
times slower than in straight-line code; unrolling a chunk amortises that (see
docs/design.md), at the price of up to ``steps_per_check - 1`` extra steps.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from bilevel import tree as tu

PyTree = Any
Field = Callable[[PyTree], PyTree]


class Status(enum.IntEnum):
  CONVERGED = 0
  MAX_STEPS = 1
  NONFINITE = 2


class FixedPointResult(NamedTuple):
  """Outcome of an equilibrium solve (per example when vmapped).

  value: the last iterate z (same pytree as z0).
  iterations: int32, number of strategy steps taken.
  residual: ||F(value)||.
  relative_residual: ||F(value)|| / max(||value||, tiny).
  converged: bool, residual met the tolerance.
  status: int32 :class:`Status` code.
  """
  value: PyTree
  iterations: jax.Array
  residual: jax.Array
  relative_residual: jax.Array
  converged: jax.Array
  status: jax.Array


class Strategy(Protocol):
  """An iteration rule for ``dz/dt = F(z)``."""

  def init(self, z: PyTree, fz: PyTree) -> PyTree:
    """Returns the strategy's state given the initial point and F there."""

  def step(self, z: PyTree, fz: PyTree, state: PyTree) -> tuple[PyTree, PyTree]:
    """Returns (next iterate, next state) from the iterate z and F(z)."""


@dataclasses.dataclass(frozen=True)
class Euler:
  """Forward Euler / damped Picard: ``z <- z + dt F(z)``."""
  dt: float = 1.0

  def init(self, z, fz):
    return ()

  def step(self, z, fz, state):
    return tu.tree_axpy(self.dt, fz, z), state


class _AndersonState(NamedTuple):
  count: jax.Array  # number of steps taken so far
  residuals: jax.Array  # [memory, n] history of dt * F(z_k)
  images: jax.Array  # [memory, n] history of z_k + dt * F(z_k)


@dataclasses.dataclass(frozen=True)
class Anderson:
  """Anderson acceleration of the Euler map ``g(z) = z + dt F(z)``.

  Solves ``min_a ||sum_i a_i r_i||^2 + ridge ||a||^2`` s.t. ``sum a = 1`` over the
  last ``memory`` residuals ``r_i = g(z_i) - z_i`` and moves to
  ``sum_i a_i (g(z_i) - (1 - mixing) r_i)``. Falls back to the Euler step when
  the small linear system is singular or non-finite.
  """
  dt: float = 1.0
  memory: int = 5
  mixing: float = 1.0
  ridge: float = 1e-6

  def init(self, z, fz):
    flat, _ = ravel_pytree(z)
    shape = (self.memory, flat.shape[0])
    return _AndersonState(jnp.zeros((), jnp.int32), jnp.zeros(shape, flat.dtype),
                          jnp.zeros(shape, flat.dtype))

  def step(self, z, fz, state):
    x, unravel = ravel_pytree(z)
    r = self.dt * ravel_pytree(fz)[0]
    slot = state.count % self.memory
    residuals = state.residuals.at[slot].set(r)
    images = state.images.at[slot].set(x + r)
    valid = jnp.arange(self.memory) < jnp.minimum(state.count + 1, self.memory)
    gram = residuals @ residuals.T
    gram = jnp.where(valid[:, None] & valid[None, :], gram, 0.0)
    scale = jnp.trace(gram) / jnp.maximum(jnp.sum(valid), 1)
    reg = self.ridge * scale + jnp.finfo(x.dtype).tiny
    gram = gram + jnp.diag(jnp.where(valid, reg, 1.0))
    weights = jnp.linalg.solve(gram, valid.astype(x.dtype))
    weights = weights / jnp.sum(weights)
    x_new = weights @ (images - (1.0 - self.mixing) * residuals)
    x_new = jnp.where(jnp.all(jnp.isfinite(x_new)), x_new, x + r)
    return unravel(x_new), _AndersonState(state.count + 1, residuals, images)


@dataclasses.dataclass(frozen=True)
class OptaxStrategy:
  """Any optax transformation, fed ``-F(z)`` as the gradient.

  With ``F = -grad E`` this is plain optimisation of the energy E; for a
  general field it is a momentum/adaptive integrator of the dynamics.
  """
  optimizer: optax.GradientTransformation

  def init(self, z, fz):
    return self.optimizer.init(z)

  def step(self, z, fz, state):
    updates, state = self.optimizer.update(tu.tree_scale(-1.0, fz), state, z)
    return optax.apply_updates(z, updates), state


def _result(z, fz, iterations, rtol, atol) -> FixedPointResult:
  residual = tu.tree_norm(fz)
  znorm = tu.tree_norm(z)
  finite = jnp.isfinite(residual) & jnp.isfinite(znorm)
  converged = finite & (residual <= atol + rtol * znorm)
  status = jnp.where(converged, Status.CONVERGED,
                     jnp.where(finite, Status.MAX_STEPS, Status.NONFINITE))
  rel = residual / jnp.maximum(znorm, jnp.finfo(residual.dtype).tiny)
  return FixedPointResult(z, jnp.asarray(iterations, jnp.int32), residual, rel,
                          converged, status.astype(jnp.int32))


def solve_fixed_point(field: Field,
                      z0: PyTree,
                      strategy: Strategy = Euler(),
                      *,
                      rtol: float = 1e-5,
                      atol: float = 0.0,
                      max_steps: int = 800,
                      steps_per_check: int = 1) -> FixedPointResult:
  """Iterates ``strategy`` on ``dz/dt = field(z)`` from ``z0`` until equilibrium.

  Not reverse-differentiable (it is a while-loop): gradients come from the
  solvers in ``solvers/`` (implicit, adjoint or least-control), or from
  :func:`unrolled_fixed_point` for backprop through the iterations.
  """
  if max_steps < 0 or steps_per_check < 1:
    raise ValueError("max_steps must be >= 0 and steps_per_check >= 1")
  fz0 = field(z0)
  init = (jnp.zeros((), jnp.int32), z0, fz0, strategy.init(z0, fz0))

  def done(carry):
    k, z, fz, _ = carry
    res = _result(z, fz, k, rtol, atol)
    return res.converged | (res.status == Status.NONFINITE)

  def cond(carry):
    return (carry[0] < max_steps) & ~done(carry)

  def body(carry):
    k, z, fz, state = carry
    for _ in range(steps_per_check):
      z, state = strategy.step(z, fz, state)
      fz = field(z)
    return k + steps_per_check, z, fz, state

  k, z, fz, _ = jax.lax.while_loop(cond, body, init)
  return _result(z, fz, k, rtol, atol)


def unrolled_fixed_point(field: Field,
                         z0: PyTree,
                         strategy: Strategy = Euler(),
                         *,
                         num_steps: int = 100,
                         rtol: float = 1e-5,
                         atol: float = 0.0,
                         unroll: int = 1) -> FixedPointResult:
  """Exactly ``num_steps`` strategy steps in a ``lax.scan``: reverse-differentiable.

  Used by backprop-through-iterations (``bp``, MAML). Memory grows linearly in
  ``num_steps`` under ``jax.grad``. Convergence is judged on the final iterate.
  """
  fz0 = field(z0)

  def body(carry, _):
    z, fz, state = carry
    z, state = strategy.step(z, fz, state)
    return (z, field(z), state), None

  (z, fz, _), _ = jax.lax.scan(body, (z0, fz0, strategy.init(z0, fz0)), None,
                               length=num_steps, unroll=unroll)
  return _result(z, fz, num_steps, rtol, atol)


STRATEGIES = {"euler": Euler, "anderson": Anderson}


def make_strategy(name: str, **options) -> Strategy:
  """Builds a strategy from a config name: ``euler``, ``anderson``, or any
  optax optimizer name (``sgd``, ``adam``, ...) with its keyword options."""
  if name in STRATEGIES:
    return STRATEGIES[name](**options)
  if hasattr(optax, name) and name not in ("apply_updates",):
    return OptaxStrategy(getattr(optax, name)(**options))
  raise ValueError(f"unknown fixed-point strategy {name!r}; use one of "
                   f"{sorted(STRATEGIES)} or an optax optimizer name such as 'sgd'")
