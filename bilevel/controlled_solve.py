"""Faster routes to a controlled steady state (the same z* as the relaxation).

Every LCP circuit defines its steady state as a zero of its controlled field,
``F(z*) = 0`` (eqs. 6, 8, 10, 14, 15). :mod:`bilevel.fixed_point` reaches it by
integrating ``dz/dt = F(z)``; the number of steps is set by the slowest mode of
the linearised dynamics. On MNIST with raw [0, 1] inputs the equilibrium RNN
trained by least control has free Jacobians with eigenvalues near 0 (Re
lambda ~ -0.05), and the controlled dynamics chain ``d_phi f``, its transpose
and the leaky integrator (rate ``k_i alpha``): hundreds of Euler steps.

:class:`NewtonKrylov` solves ``F(z) = 0`` directly, started where the
relaxation starts (the free equilibrium): each Newton step solves
``dF(z) dz = -F(z)`` by GMRES on Jacobian-vector products (``jax.linearize``;
no Jacobian is formed), then backtracks along ``dz`` until ``||F||`` decreases.
A slow mode costs GMRES one Krylov vector instead of ``1 / |lambda|`` Euler
steps. The stopping rule is the engine's, ``||F(z)|| <= atol + rtol ||z||``,
so the result is the same steady state to the same tolerance; Newton's path
is invariant to a row scaling of F, so the controller gain ``k_i`` changes
neither the answer nor the path.

``iterations`` in the result counts evaluations of F plus Jacobian-vector
products (one JVP costs about one evaluation), so it compares with the step
count of a relaxation. Written for one example; ``jax.vmap`` batches it.

:class:`Reduced` eliminates the controller's state instead: the integral
controller's own steady state is ``u*(phi) = -grad_y L / alpha`` (eq. 6), so z*
is also the fixed point of the dynamics with ``u`` held at ``u*(phi)`` (the
limit ``k_i -> infinity``), a system in the remaining blocks alone. For the
direct field of an energy-based f = -grad E (eq. 17, Omniglot) that system is
gradient flow on ``E + (1/alpha + k_p) L``, which heavy-ball steps solve at the
rate of the free phase, where the joint (phi, u) dynamics are non-symmetric
and, at small alpha, stiff.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel import fixed_point as fp
from bilevel import tree as tu

PyTree = Any


class _Arnoldi(NamedTuple):
  k: jax.Array  # Krylov vectors built so far
  basis: jax.Array  # [dim + 1, n] orthonormal Krylov basis
  hess: jax.Array  # [dim + 1, dim] Hessenberg matrix, Givens-rotated to triangular
  cs: jax.Array  # [dim] Givens cosines
  sn: jax.Array  # [dim] Givens sines
  g: jax.Array  # [dim + 1] rotated right-hand side; |g[k]| = residual norm


def _givens(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  r = jnp.hypot(a, b)
  safe = jnp.where(r > 0, r, 1.0)
  return jnp.where(r > 0, a / safe, 1.0), jnp.where(r > 0, b / safe, 0.0)


def _arnoldi_step(matvec: Callable, dim: int, s: _Arnoldi) -> _Arnoldi:
  """One GMRES step: new Krylov vector (classical Gram-Schmidt twice, which is
  two matrix products instead of k sequential dot products), then Givens."""
  mask = (jnp.arange(dim + 1) <= s.k).astype(s.basis.dtype)
  w = matvec(s.basis[s.k])
  h = (s.basis @ w) * mask
  w = w - h @ s.basis
  h2 = (s.basis @ w) * mask
  w, h = w - h2 @ s.basis, h + h2
  norm = jnp.linalg.norm(w)
  basis = s.basis.at[s.k + 1].set(w / jnp.where(norm > 0, norm, 1.0))
  h = h.at[s.k + 1].set(norm)

  def rotate(i, col):  # the earlier rotations, in order, on the new column
    a, b = col[i], col[i + 1]
    new = col.at[i].set(s.cs[i] * a + s.sn[i] * b).at[i + 1].set(-s.sn[i] * a + s.cs[i] * b)
    return jnp.where(i < s.k, new, col)

  h = jax.lax.fori_loop(0, dim, rotate, h)
  c, sn = _givens(h[s.k], h[s.k + 1])
  h = h.at[s.k].set(c * h[s.k] + sn * h[s.k + 1]).at[s.k + 1].set(0.0)
  g = s.g.at[s.k + 1].set(-sn * s.g[s.k]).at[s.k].set(c * s.g[s.k])
  return _Arnoldi(s.k + 1, basis, s.hess.at[:, s.k].set(h), s.cs.at[s.k].set(c),
                  s.sn.at[s.k].set(sn), g)


def gmres(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *, dim: int,
          rtol: float) -> tuple[jax.Array, jax.Array]:
  """x with ``||A x - b|| <= rtol ||b||`` from x0 = 0 in at most ``dim`` steps
  (no restart). Returns (x, number of matvecs)."""
  n, dtype = b.shape[0], b.dtype
  beta = jnp.linalg.norm(b)
  basis = jnp.zeros((dim + 1, n), dtype).at[0].set(b / jnp.where(beta > 0, beta, 1.0))
  init = _Arnoldi(jnp.zeros((), jnp.int32), basis, jnp.zeros((dim + 1, dim), dtype),
                  jnp.ones(dim, dtype), jnp.zeros(dim, dtype),
                  jnp.zeros(dim + 1, dtype).at[0].set(beta))
  s = jax.lax.while_loop(
      lambda s: (s.k < dim) & (jnp.abs(s.g[s.k]) > rtol * beta) & jnp.isfinite(s.g[s.k]),
      lambda s: _arnoldi_step(matvec, dim, s), init)
  # Triangular solve on the first k columns; unused ones are identity rows.
  used = jnp.arange(dim) < s.k
  r = jnp.where(used[:, None] & used[None, :], s.hess[:dim], 0.0) + jnp.diag(
      jnp.where(used, 0.0, 1.0))
  y = jax.scipy.linalg.solve_triangular(r, jnp.where(used, s.g[:dim], 0.0), lower=False)
  return y @ s.basis[:dim], s.k


class _Newton(NamedTuple):
  evals: jax.Array  # F evaluations + JVPs so far
  x: jax.Array
  fx: jax.Array


@dataclasses.dataclass(frozen=True)
class NewtonKrylov:
  """Inexact Newton on ``F(z) = 0`` with GMRES inner solves and backtracking.

  krylov_dim: GMRES steps per Newton step (the Krylov space, no restart).
  forcing: inner tolerance ``||dF dz + F|| <= forcing ||F||``.
  backtracks: at most this many halvings of the step while ``||F||`` grows.
  max_work: Newton's budget (F evaluations + JVPs). An example it leaves
    unconverged -- near a fold of the controlled system, where the Jacobian is
    nearly singular and Newton can leave the relaxation's basin -- is finished
    by the relaxation from its own start z0 (``fallback``), so the answer is
    always the relaxation's steady state.
  """
  krylov_dim: int = 30
  forcing: float = 1e-3
  backtracks: int = 4
  max_work: int = 120
  fallback: bool = True

  def __post_init__(self):
    if (self.krylov_dim < 1 or not 0 < self.forcing < 1 or self.backtracks < 0
        or self.max_work < 1):
      raise ValueError(f"NewtonKrylov needs krylov_dim >= 1, 0 < forcing < 1, "
                       f"backtracks >= 0 and max_work >= 1; got {self.krylov_dim}, "
                       f"{self.forcing}, {self.backtracks}, {self.max_work}")

  def _line_search(self, f, x, fx, dx):
    """First t in 1, 1/2, ... with ||F(x + t dx)|| < ||F(x)|| (else the last t)."""
    norm0 = jnp.linalg.norm(fx)

    def cond(c):
      t, n, _, fy = c
      bad = ~(jnp.linalg.norm(fy) < norm0) | ~jnp.all(jnp.isfinite(fy))
      return bad & (n <= self.backtracks)

    def body(c):
      t, n, _, _ = c
      y = x + 0.5 * t * dx
      return 0.5 * t, n + 1, y, f(y)

    y = x + dx
    _, n, y, fy = jax.lax.while_loop(cond, body, (jnp.ones((), x.dtype), jnp.zeros(
        (), jnp.int32), y, f(y)))
    return y, fy, n + 1

  def solve(self, field: fp.Field, z0: PyTree, *, rtol: float, atol: float = 0.0,
            max_steps: Optional[int] = None,
            block_floor: float = fp.BLOCK_FLOOR) -> fp.FixedPointResult:
    """Newton steps from ``z0`` until the engine's per-block rule holds
    (:func:`bilevel.fixed_point.block_tolerance_check`) or the work (evaluations
    + JVPs) passes ``max_steps`` (default ``max_work``)."""
    budget = self.max_work if max_steps is None else max_steps
    x0, unravel = ravel_pytree(z0)
    f = lambda x: ravel_pytree(field(unravel(x)))[0]

    def cond(s):
      done, _ = fp.block_tolerance_check(
          fp.block_norms(unravel(s.fx)), fp.block_norms(unravel(s.x)), rtol=rtol,
          atol=atol, block_floor=block_floor)
      finite = jnp.all(jnp.isfinite(s.fx)) & jnp.all(jnp.isfinite(s.x))
      return (s.evals < budget) & ~done & finite

    def body(s):
      _, jvp = jax.linearize(f, s.x)  # one linearisation serves every GMRES step
      dx, k = gmres(jvp, -s.fx, dim=self.krylov_dim, rtol=self.forcing)
      x, fx, n = self._line_search(f, s.x, s.fx, dx)
      return _Newton(s.evals + k + n, x, fx)

    fx0 = f(x0)
    s = jax.lax.while_loop(cond, body, _Newton(jnp.ones((), jnp.int32), x0, fx0))
    return fp.make_result(unravel(s.x), fp.block_norms(unravel(s.fx)),
                          fp.block_norms(unravel(s.x)), s.evals, rtol=rtol, atol=atol,
                          block_floor=block_floor, initial_residual=jnp.linalg.norm(fx0))


@dataclasses.dataclass(frozen=True)
class Reduced:
  """Relaxation of the controlled field with ``u`` pinned at ``u*(phi)``.

  ``pin(z)`` returns z with its ``u`` block set to the controller's steady state
  for ``z.phi``; the ``u`` block's own time derivative is then zero by
  construction (eq. 6), so the relaxation's residual is the full field's.
  """

  @staticmethod
  def field(field: fp.Field, pin: Callable[[PyTree], PyTree]) -> fp.Field:
    """The controlled field on the pinned state, the ``u`` block's rate set to 0."""

    def reduced(z):
      dz = field(pin(z))
      return dz._replace(u=tu.tree_zeros_like(dz.u))

    return reduced


ROUTES = ("relaxation", "newton", "reduced")
Route = Optional[NewtonKrylov | Reduced]


def make_route(spec: Optional[str | Mapping[str, Any]]) -> Route:
  """``"relaxation"`` / None -> None (integrate the dynamics); ``"newton"`` or
  ``{"method": "newton", "krylov_dim": ..., ...}`` -> :class:`NewtonKrylov`;
  ``"reduced"`` -> :class:`Reduced`."""
  if spec is None or isinstance(spec, (NewtonKrylov, Reduced)):
    return spec
  options = {"method": spec} if isinstance(spec, str) else dict(spec)
  method = options.pop("method", "relaxation")
  if method not in ROUTES:
    raise ValueError(f"controlled_solve method must be one of {ROUTES}, got {method!r}")
  if method == "reduced":
    if options:
      raise ValueError(f"controlled_solve 'reduced' takes no options, got {options}")
    return Reduced()
  return NewtonKrylov(**options) if method == "newton" else None


def solve_controlled(route: Route, relaxation, make_field: Callable[[PyTree], fp.Field],
                     make_pin: Callable[[PyTree], Callable[[PyTree], PyTree]],
                     inputs: PyTree, z0: PyTree) -> fp.FixedPointResult:
  """The controlled steady states of a batch from ``z0`` (leading axis: examples);
  ``make_field(inputs_i)`` / ``make_pin(inputs_i)`` give example i's field and u-pin.

  ``relaxation.solve_batch`` when ``route`` is None; with ``u`` eliminated
  (:class:`Reduced`); else Newton-Krylov per example to the relaxation's
  tolerance, with the relaxation finishing (from z0) what Newton leaves
  unconverged.
  """
  pin_each = lambda zs: jax.vmap(lambda i, z: make_pin(i)(z))(inputs, zs)
  if route is None:
    return relaxation.solve_batch(make_field, inputs, z0)
  if isinstance(route, Reduced):
    res = relaxation.solve_batch(lambda i: route.field(make_field(i), make_pin(i)), inputs,
                                 pin_each(z0))
    return res._replace(value=pin_each(res.value))
  newton = jax.vmap(lambda i, z: route.solve(
      make_field(i), z, rtol=relaxation.rtol, atol=relaxation.atol,
      max_steps=min(route.max_work, relaxation.max_steps),
      block_floor=relaxation.block_floor))(inputs, z0)
  if not route.fallback:
    return newton
  # A converged example starts the relaxation at its solution, so it takes 0 steps
  # there (the batch runs until every example is done).
  start = fp.select_examples(newton.converged, newton.value, z0)
  relaxed = relaxation.solve_batch(make_field, inputs, start)
  return relaxed._replace(iterations=newton.iterations + relaxed.iterations,
                          initial_residual=newton.initial_residual)
