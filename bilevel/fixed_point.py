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
* :class:`RestartingNesterov` -- Nesterov heavy ball with per-example adaptive
  restart and step control, for gradient fields whose curvature may exceed what
  a fixed step tolerates (inner learning loops at meta-trained weights).

The loop is a ``lax.while_loop`` that stops when every *block* b of the state
meets ``||F_b(z)|| <= atol + rtol * max(||z_b||, block_floor * ||z||)``, when
``max_steps`` is reached or when ``F`` stops being finite. It never raises: the
outcome is reported in :class:`FixedPointResult` (iterations, whole-state and
worst-block residuals, status).

Why per block: a joint state mixes variables of different scales -- the
controlled state z = (phi, psi, u) of eqs. 6 and 8 has ``||u|| ~ ||grad_y L|| /
alpha``, hundreds of times ``||phi||`` at small alpha with a cross-entropy --
and a test against ``rtol ||z||`` then lets the phi and psi equations stop
hundreds of times early, while the update (eq. 4) reads psi and phi. A block is
a *top-level field* of the state (a NamedTuple field, dict entry or tuple
element; a bare array is one block), not a leaf: fields are the variables that
carry different units, whereas leaves inside one field (layers, weights and
biases) share them, and a per-leaf test would demand relative accuracy of
leaves that are ~0 (biases, unused layers). ``block_floor`` (default 1e-3)
floors a block's scale at a fraction of the whole state's norm: a block that
tends to exactly 0 (psi and u when the free state already minimises L) can
never meet a test relative to itself, while a block 1000x smaller than the
state still keeps its own relative test. ``atol`` remains for states that tend
to 0 as a whole.
The engine is written for one example; ``jax.vmap`` over it gives per-example
stopping (an example that converged is frozen while the others continue), and a
diverging example only marks its own status. :func:`solve_compacted` is that
vmap with the batch shrunk to the examples still running, so that a few slow
examples do not make every step cost the whole batch.

``steps_per_check`` runs several strategy steps (unrolled in Python) per
while-loop iteration. On CPU, convolutions inside a while-loop body run several
times slower than in straight-line code; unrolling a chunk amortises that (see
docs/design.md), at the price of up to ``steps_per_check - 1`` extra steps.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from bilevel import tree as tu

PyTree = Any
Field = Callable[[PyTree], PyTree]


# Floor of a block's scale, relative to the whole state's norm (see
# block_tolerance_check): a block tending to exactly 0 (psi when the free
# equilibrium already minimises L) would otherwise never meet a relative test.
# 1e-3 keeps a block 1000x smaller than the state on its own relative rule.
BLOCK_FLOOR = 1e-3


class Status(enum.IntEnum):
  CONVERGED = 0
  MAX_STEPS = 1
  NONFINITE = 2


class FixedPointResult(NamedTuple):
  """Outcome of an equilibrium solve (per example when vmapped).

  value: the last iterate z (same pytree as z0).
  iterations: int32, number of strategy steps taken.
  residual: ||F(value)||.
  relative_residual: ||F(value)|| / max(||value||, tiny), over the whole state.
  converged: bool, every block met the per-block tolerance (see
    :func:`block_tolerance_check`).
  status: int32 :class:`Status` code.
  block_relative_residual: the worst block's ``||F_b|| / s_b`` (the quantity
    the stopping rule compares with ``rtol``, up to ``atol``).
  initial_residual: ||F(z0)||; ``residual / initial_residual`` says how far the
    phase got, also when it stopped on its budget.
  """
  value: PyTree
  iterations: jax.Array
  residual: jax.Array
  relative_residual: jax.Array
  converged: jax.Array
  status: jax.Array
  block_relative_residual: jax.Array
  initial_residual: jax.Array


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


class _RestartState(NamedTuple):
  trace: PyTree  # momentum trace t_k = F(z_k) + momentum * t_{k-1}
  last_move: PyTree  # z_k - z_{k-1}
  learning_rate: jax.Array  # this example's current step
  calm_steps: jax.Array  # steps since the last restart


@dataclasses.dataclass(frozen=True)
class RestartingNesterov:
  """Nesterov heavy ball with adaptive restart and step control, for gradient fields.

  The step of ``optax.sgd(lr, momentum, nesterov=True)`` fed ``-F``:
  ``t <- F(z) + momentum t``, ``z <- z + lr (F(z) + momentum t)``, with two
  per-example safeguards that need only F (O'Donoghue & Candes 2015, gradient
  restart): when the new force opposes the last move (``<F(z_k), z_k - z_{k-1}>
  < 0``, an overshoot) the trace is reset to zero; when the plain gradient step
  taken right after a restart overshoots again, the step is above the stable
  one for the local curvature and ``lr`` is multiplied by ``shrink``. After
  ``patience`` steps without a restart ``lr`` grows by ``grow``, never above
  the configured ``learning_rate``, so on a task where momentum SGD converges
  the iteration reaches the same fixed point at the configured rate, and on a
  task where it oscillates (curvature above ``~1.3 / lr``) it converges at a
  step it finds itself. Meant for ``F = -grad E``: for a non-conservative
  field the restart test is a heuristic.
  """
  learning_rate: float
  momentum: float = 0.9
  shrink: float = 0.5
  grow: float = 1.1
  patience: int = 20

  def init(self, z, fz):
    zeros = tu.tree_zeros_like(z)
    dtype = jnp.result_type(*jax.tree.leaves(z))
    return _RestartState(zeros, zeros, jnp.asarray(self.learning_rate, dtype),
                         jnp.zeros((), jnp.int32))

  def step(self, z, fz, state):
    overshoot = tu.tree_vdot(fz, state.last_move) < 0
    lr = jnp.where(overshoot & (state.calm_steps == 0), state.learning_rate * self.shrink,
                   state.learning_rate)
    lr = jnp.where(state.calm_steps >= self.patience,
                   jnp.minimum(lr * self.grow, self.learning_rate), lr)
    trace = tu.tree_axpy(jnp.where(overshoot, 0.0, self.momentum), state.trace, fz)
    move = tu.tree_scale(lr, tu.tree_axpy(self.momentum, trace, fz))
    calm = jnp.where(overshoot, 0, state.calm_steps + 1)
    return tu.tree_add(z, move), _RestartState(trace, move, lr, calm)


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


def block_norms(tree: PyTree) -> jax.Array:
  """Euclidean norm of each block of ``tree``: ``[num_blocks]``.

  A block is one top-level child of the pytree (a field of a NamedTuple, an
  entry of a dict, tuple or list) with all the leaves under it; a bare array is
  one block. Empty children are dropped; an empty tree gives ``[0.]``.
  """
  squares: dict[Any, jax.Array] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    key = path[:1]  # () for a bare array: one block
    sq = jnp.sum(jnp.real(jnp.conj(leaf) * leaf))
    squares[key] = squares[key] + sq if key in squares else sq
  if not squares:
    return jnp.zeros((1,), jnp.float32)
  return jnp.sqrt(jnp.stack(list(squares.values())))


def block_tolerance_check(fz_norms: jax.Array, scale_norms: jax.Array, *, rtol: float,
                          atol: float, block_floor: float = BLOCK_FLOOR
                          ) -> tuple[jax.Array, jax.Array]:
  """The per-block stopping rule: (all blocks met, worst block's relative residual).

  Block b meets ``||F_b|| <= atol + rtol * s_b`` with the block scale
  ``s_b = max(||z_b||, block_floor * ||z||)``; the worst relative residual is
  ``max_b ||F_b|| / s_b``. Non-finite norms never meet it.
  """
  total = jnp.sqrt(jnp.sum(scale_norms ** 2))
  scale = jnp.maximum(scale_norms, block_floor * total)
  met = jnp.all(fz_norms <= atol + rtol * scale)
  worst = jnp.max(fz_norms / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny))
  finite = jnp.all(jnp.isfinite(fz_norms)) & jnp.all(jnp.isfinite(scale_norms))
  return met & finite, worst


def make_result(value: PyTree, fz_norms: jax.Array, scale_norms: jax.Array,
                iterations, *, rtol: float, atol: float, initial_residual: jax.Array,
                block_floor: float = BLOCK_FLOOR,
                whole_scale: jax.Array | None = None) -> FixedPointResult:
  """Builds a :class:`FixedPointResult` from per-block norms of F and of the scale.

  ``whole_scale`` (default ``||scale||``) is the denominator of the reported
  whole-state ``relative_residual``.
  """
  residual = jnp.sqrt(jnp.sum(fz_norms ** 2))
  whole = jnp.sqrt(jnp.sum(scale_norms ** 2)) if whole_scale is None else whole_scale
  converged, worst = block_tolerance_check(fz_norms, scale_norms, rtol=rtol, atol=atol,
                                           block_floor=block_floor)
  finite = jnp.isfinite(residual) & jnp.isfinite(whole)
  status = jnp.where(converged, Status.CONVERGED,
                     jnp.where(finite, Status.MAX_STEPS, Status.NONFINITE))
  rel = residual / jnp.maximum(whole, jnp.finfo(residual.dtype).tiny)
  return FixedPointResult(value, jnp.asarray(iterations, jnp.int32), residual, rel,
                          converged, status.astype(jnp.int32), worst,
                          jnp.asarray(initial_residual, residual.dtype))


def _result(z, fz, iterations, rtol, atol, block_floor, fz0) -> FixedPointResult:
  return make_result(z, block_norms(fz), block_norms(z), iterations, rtol=rtol, atol=atol,
                     block_floor=block_floor, initial_residual=tu.tree_norm(fz0))


def solve_fixed_point(field: Field,
                      z0: PyTree,
                      strategy: Strategy = Euler(),
                      *,
                      rtol: float = 1e-5,
                      atol: float = 0.0,
                      max_steps: int = 800,
                      steps_per_check: int = 1,
                      block_floor: float = BLOCK_FLOOR,
                      quorum: float = 1.0,
                      axis_name: Optional[str] = None) -> FixedPointResult:
  """Iterates ``strategy`` on ``dz/dt = field(z)`` from ``z0`` until equilibrium.

  Under ``jax.vmap(..., axis_name=axis_name)`` with ``quorum < 1`` the whole
  batch stops once that fraction of its examples has finished (converged, or
  diverged): the rest (status
  MAX_STEPS) are examples whose dynamics take far longer than the others or
  never settle, and a vmapped while-loop would otherwise run every example to
  the slowest one's step count.

  Not reverse-differentiable (it is a while-loop): gradients come from the
  solvers in ``solvers/`` (implicit, adjoint or least-control), or from
  :func:`unrolled_fixed_point` for backprop through the iterations.
  """
  if max_steps < 0 or steps_per_check < 1:
    raise ValueError("max_steps must be >= 0 and steps_per_check >= 1")
  if not 0 < quorum <= 1:
    raise ValueError(f"quorum must be in (0, 1], got {quorum}")
  fz0 = field(z0)
  init = (jnp.zeros((), jnp.int32), z0, fz0, strategy.init(z0, fz0))

  def done(carry):
    return _stopped(carry[1], carry[2], rtol=rtol, atol=atol, block_floor=block_floor)

  def cond(carry):
    running = (carry[0] < max_steps) & ~done(carry)
    if axis_name is None or quorum == 1:
      return running
    converged = jax.lax.pmean(done(carry).astype(jnp.float32), axis_name)
    return running & (converged < quorum)

  def body(carry):
    k, z, fz, state = carry
    for _ in range(steps_per_check):
      z, state = strategy.step(z, fz, state)
      fz = field(z)
    return k + steps_per_check, z, fz, state

  k, z, fz, _ = jax.lax.while_loop(cond, body, init)
  return _result(z, fz, k, rtol, atol, block_floor, fz0)


def _take(tree: PyTree, idx: jax.Array) -> PyTree:
  return jax.tree.map(lambda a: a[idx], tree)


def _put(tree: PyTree, idx: jax.Array, part: PyTree) -> PyTree:
  return jax.tree.map(lambda a, b: a.at[idx].set(b), tree, part)


def select_examples(flags: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """Per example (leading axis): ``new`` where ``flags``, else ``old``."""
  return jax.tree.map(
      lambda a, b: jnp.where(flags.reshape(flags.shape + (1,) * (a.ndim - 1)), a, b),
      new, old)


def compaction_sizes(batch_size: int, stages: int) -> list[int]:
  """Working-set sizes of :func:`solve_compacted`: ``B, ceil(B/2), ceil(B/4), ...``,
  ``stages`` halvings at most, each size once."""
  sizes = [batch_size]
  for _ in range(stages):
    if sizes[-1] == 1:
      break
    sizes.append(-(-sizes[-1] // 2))
  return sizes


def solve_compacted(make_field: Callable[[PyTree], Field],
                    inputs: PyTree,
                    z0: PyTree,
                    strategy: Strategy = Euler(),
                    *,
                    stages: int,
                    rtol: float = 1e-5,
                    atol: float = 0.0,
                    max_steps: int = 800,
                    steps_per_check: int = 1,
                    block_floor: float = BLOCK_FLOOR) -> FixedPointResult:
  """``jax.vmap`` of :func:`solve_fixed_point` over a batch, on a shrinking working set.

  ``make_field(inputs_i)`` is example i's field; ``inputs`` and ``z0`` carry the
  batch on their leading axis ``[B, ...]``. A vmapped while-loop evaluates the
  field on all B examples until the slowest one stops, so a few examples that
  need many more steps (or never settle) set the cost of the batch. Here the
  loop runs on all B until at most ``ceil(B/2)`` are still running, then
  gathers those into a working set of half the size, and so on for ``stages``
  halvings; the last working set runs until every example in it has stopped.
  Each example follows exactly the iterates, stopping rule and budget it has
  under ``jax.vmap(solve_fixed_point)`` (same per-example result up to the
  rounding of a different batch size), at a cost of about
  ``sum_s size_s * steps_s`` field evaluations instead of ``B * max steps``.
  Worth it where the cost of a step grows with the batch (CPU); on an
  accelerator a small working set costs about as much as a big one.
  """
  if max_steps < 0 or steps_per_check < 1 or stages < 0:
    raise ValueError("max_steps and stages must be >= 0 and steps_per_check >= 1")
  batch_size = jax.tree.leaves(z0)[0].shape[0]
  fields = lambda inp, z: jax.vmap(lambda i, zi: make_field(i)(zi))(inp, z)
  running = functools.partial(_running, rtol=rtol, atol=atol, max_steps=max_steps,
                              block_floor=block_floor)
  fz0 = fields(inputs, z0)
  carry = (jnp.zeros((batch_size,), jnp.int32), z0, fz0, jax.vmap(strategy.init)(z0, fz0))
  sizes = compaction_sizes(batch_size, stages)
  idx = jnp.arange(batch_size)
  for stage in range(len(sizes)):
    # Stop this stage once the next, smaller working set can hold every example
    # still running (the last stage: once none is).
    leave_at = sizes[stage + 1] if stage + 1 < len(sizes) else 0
    part_fields = functools.partial(fields, _take(inputs, idx))
    part = _compacted_stage(part_fields, strategy, running, _take(carry, idx), leave_at,
                            steps_per_check)
    carry = _put(carry, idx, part)
    if stage + 1 < len(sizes):
      # The still-running examples first (a stable sort keeps batch order), padded
      # with stopped ones, which the loop leaves unchanged.
      idx = jnp.argsort(~running(*carry[:3]), stable=True)[:sizes[stage + 1]]
  k, z, fz, _ = carry
  return jax.vmap(lambda zi, fzi, ki, f0: _result(zi, fzi, ki, rtol, atol, block_floor, f0))(
      z, fz, k, fz0)


def _stopped(z, fz, *, rtol, atol, block_floor) -> jax.Array:
  """One example's stopping rule: converged, or no longer finite."""
  met, _ = block_tolerance_check(block_norms(fz), block_norms(z), rtol=rtol, atol=atol,
                                 block_floor=block_floor)
  return met | ~jnp.isfinite(tu.tree_norm(fz)) | ~jnp.isfinite(tu.tree_norm(z))


def _running(k, z, fz, *, rtol, atol, max_steps, block_floor) -> jax.Array:
  """``[B]``: examples of a batch still running under :func:`solve_fixed_point`'s rule."""
  stopped = jax.vmap(functools.partial(_stopped, rtol=rtol, atol=atol,
                                       block_floor=block_floor))(z, fz)
  return (k < max_steps) & ~stopped


def _compacted_stage(fields, strategy, running, carry, leave_at: int, steps_per_check: int):
  """Steps one working set ``(k, z, F(z), strategy state)`` until at most ``leave_at``
  of its examples still run; stopped examples are frozen, as under vmap."""

  def body(c):
    k, z, fz, state = c
    active = running(k, z, fz)
    z1, fz1, state1 = z, fz, state
    for _ in range(steps_per_check):
      z1, state1 = jax.vmap(strategy.step)(z1, fz1, state1)
      fz1 = fields(z1)
    z, fz, state = select_examples(active, (z1, fz1, state1), (z, fz, state))
    return k + steps_per_check * active.astype(k.dtype), z, fz, state

  return jax.lax.while_loop(lambda c: jnp.sum(running(*c[:3])) > leave_at, body, carry)


def unrolled_fixed_point(field: Field,
                         z0: PyTree,
                         strategy: Strategy = Euler(),
                         *,
                         num_steps: int = 100,
                         rtol: float = 1e-5,
                         atol: float = 0.0,
                         unroll: int = 1,
                         block_floor: float = BLOCK_FLOOR,
                         remat: bool = False) -> FixedPointResult:
  """Exactly ``num_steps`` strategy steps in a ``lax.scan``: reverse-differentiable.

  Used by backprop-through-iterations (``bp``, MAML). Memory grows linearly in
  ``num_steps`` under ``jax.grad``: with every intermediate of the field per step,
  or with ``remat`` only the carried iterate and strategy state per step (the
  field's intermediates are recomputed in the backward pass, about one more field
  evaluation per step). Convergence is judged on the final iterate.
  """
  fz0 = field(z0)

  def body(carry, _):
    z, fz, state = carry
    z, state = strategy.step(z, fz, state)
    return (z, field(z), state), None

  if remat:
    body = jax.checkpoint(body)

  (z, fz, _), _ = jax.lax.scan(body, (z0, fz0, strategy.init(z0, fz0)), None,
                               length=num_steps, unroll=unroll)
  return _result(z, fz, num_steps, rtol, atol, block_floor, fz0)


STRATEGIES = {"euler": Euler, "anderson": Anderson, "restarting_nesterov": RestartingNesterov}


def make_strategy(name: str, **options) -> Strategy:
  """Builds a strategy from a config name: ``euler``, ``anderson``, or any
  optax optimizer name (``sgd``, ``adam``, ...) with its keyword options."""
  if name in STRATEGIES:
    return STRATEGIES[name](**options)
  if hasattr(optax, name) and name not in ("apply_updates",):
    return OptaxStrategy(getattr(optax, name)(**options))
  raise ValueError(f"unknown fixed-point strategy {name!r}; use one of "
                   f"{sorted(STRATEGIES)} or an optax optimizer name such as 'sgd'")
