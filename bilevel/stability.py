"""Is an equilibrium stable? The rightmost eigenvalue of ``J = d_phi f(phi*)``.

Every method of the paper assumes the free equilibrium phi* of eq. 1 is
*stable* (all eigenvalues of J with negative real part): the implicit gradient
(eq. 5) differentiates the equilibrium the dynamics actually reach, and the
least-control circuits (eqs. 8, 10, 14, 15) relax the controlled dynamics
around it. A residual test cannot tell: ``f(phi*) = 0`` holds at an unstable
fixed point too, and Anderson acceleration (a secant method) converges to
unstable fixed points as readily as to stable ones. There eq. 5 is still the
derivative of *a* root of f, but not of the state the network settles to, and
the LCP controlled dynamics may not settle at all.

:func:`leading_eigenvalue` estimates ``max Re eig(J)`` matrix-free (one
``jax.linearize`` of the field, then Jacobian-vector products only):

1. the spectral radius ``rho`` of J by a few power steps on J;
2. subspace (block power) iteration with two vectors on ``M = I + h J``,
   ``h = 1 / rho``. M maps an eigenvalue ``lambda`` of J to ``1 + h lambda``:
   every real stable eigenvalue lands in ``[0, 1)``, every unstable one
   outside the unit circle, so the dominant eigenvalues of M are the
   rightmost ones of J. Two vectors capture a complex-conjugate pair (an
   oscillatory instability) as well as a real eigenvalue;
3. Rayleigh-Ritz: the eigenvalues of the 2x2 projection ``Q^T J Q`` in closed
   form (no general eigensolver, so it runs on any backend and under vmap).

When to use it: on problems whose inner dynamics can have several fixed
points (recurrent nets with a recurrent gain above 1, any field that is not a
contraction), always when the free phase uses Anderson, and whenever an
implicit or LCP gradient disagrees with backprop through the iterations. It
costs about ``num_steps + 1`` Jacobian-vector products per example, so a check
every N training steps or on the evaluation batch is usually enough; energy
problems (f = -grad E) only need it when E may be non-convex.

Limits: it is an estimate after a few steps. A stable eigenvalue close to the
imaginary axis with a large imaginary part (``|lambda| > 2 |Re lambda|``) also
maps outside the unit circle and can mask a weakly unstable one; for a
strongly non-normal J the Ritz value lies in J's field of values and can be
slightly to the right of the true eigenvalue. More steps sharpen both.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

PyTree = Any


def _orthonormal(v: jax.Array) -> jax.Array:
  """Orthonormal columns spanning the two columns of ``v`` ([n, 2]), by
  Gram-Schmidt; a degenerate column is left at zero instead of raising."""
  tiny = jnp.finfo(v.dtype).tiny
  a = v[:, 0] / jnp.maximum(jnp.linalg.norm(v[:, 0]), tiny)
  b = v[:, 1] - jnp.vdot(a, v[:, 1]) * a
  b = b / jnp.maximum(jnp.linalg.norm(b), tiny)
  return jnp.stack([a, b], axis=1)


def _rightmost_of_2x2(m: jax.Array) -> jax.Array:
  """max Re of the eigenvalues of a real 2x2 matrix, in closed form."""
  half_trace = 0.5 * (m[0, 0] + m[1, 1])
  det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
  # Complex pair when the discriminant is negative: both have Re = trace / 2.
  return half_trace + jnp.sqrt(jnp.maximum(half_trace ** 2 - det, 0.0))


def _spectral_radius(matvec: Callable[[jax.Array], jax.Array], v: jax.Array,
                     num_steps: int) -> jax.Array:
  """Power-iteration estimate of ``rho(J)``: ``max_k ||J v_k||`` over normalised iterates."""
  tiny = jnp.finfo(v.dtype).tiny

  def body(_, carry):
    v, rho = carry
    w = matvec(v)
    norm = jnp.linalg.norm(w)
    return w / jnp.maximum(norm, tiny), jnp.maximum(rho, norm)

  v = v / jnp.maximum(jnp.linalg.norm(v), tiny)
  _, rho = jax.lax.fori_loop(0, num_steps, body, (v, jnp.zeros((), v.dtype)))
  return rho


def leading_eigenvalue(field: Callable[[PyTree], PyTree], z_star: PyTree, key: jax.Array,
                       num_steps: int = 20, *, threshold: float = 0.0
                       ) -> tuple[jax.Array, jax.Array]:
  """Estimates ``max Re eig(d field(z_star))`` and whether it is below ``threshold``.

  Args:
    field: ``phi -> f(params, phi, example)`` for one example (any pytree).
    z_star: the equilibrium found (e.g. ``FixedPointResult.value``).
    key: PRNG key of the random start (one per example under vmap).
    num_steps: iterations on ``I + h J``; ``max(num_steps // 4, 2)`` more go
      to estimating ``h``. Each costs two (one) Jacobian-vector products.
    threshold: ``stable`` iff the estimate is below it (0: asymptotic
      stability; a small negative value asks for a decay-rate margin).

  Returns ``(estimate, stable)``: a real scalar in the state's dtype and a bool;
  both NaN/False when the Jacobian is not finite. Never raises under jit.
  """
  flat, unravel = ravel_pytree(z_star)
  _, jvp = jax.linearize(lambda v: ravel_pytree(field(unravel(v)))[0], flat)
  block_jvp = jax.vmap(jvp, in_axes=1, out_axes=1)
  start = jax.random.normal(key, (flat.shape[0], 2), flat.dtype)
  rho = _spectral_radius(jvp, start[:, 0], max(num_steps // 4, 2))
  # h = 1 / rho maps real stable eigenvalues into (-1, 1) as long as the
  # estimate is at least half the true spectral radius (power iteration
  # underestimates it); a smaller h converges more slowly.
  h = 1.0 / jnp.maximum(rho, jnp.finfo(flat.dtype).tiny)

  def body(_, q):
    return _orthonormal(q + h * block_jvp(q))

  q = jax.lax.fori_loop(0, num_steps, body, _orthonormal(start))
  estimate = _rightmost_of_2x2(q.T @ block_jvp(q))
  # A state of size 1 has a zero second column: its 2x2 projection is
  # [[lambda, 0], [0, 0]]; read lambda alone there.
  if flat.shape[0] == 1:
    estimate = (q.T @ block_jvp(q))[0, 0]
  estimate = jnp.where(jnp.isfinite(estimate), estimate, jnp.nan)
  return estimate, jnp.isfinite(estimate) & (estimate < threshold)
