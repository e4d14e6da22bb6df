"""Matrix-free linear solves for adjoints: ``A x = b`` with ``A`` a matvec.

Recurrent backprop needs ``w = -(d_phi f)^{-T} grad L`` (eq. 5). Three
matrix-free routes share one result type (:class:`FixedPointResult`):

* ``fixed_point`` -- the adjoint dynamics ``dw/dt = A w - b`` for a stable
  ``A`` (all eigenvalues with negative real part), solved by the equilibrium
  engine with any strategy (Euler, Anderson);
* ``neumann`` -- the truncated Neumann series of the same map: a fixed number of
  Euler steps from zero, no early stop;
* ``cg`` -- conjugate gradients, for symmetric negative-definite ``A`` (energy
  problems, f = -grad E, so A = -Hessian; iMAML's ``I + H / lambda``).

All return the residual ``||A x - b||`` and a status, never raise inside jit.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from bilevel import fixed_point as fp
from bilevel import tree as tu

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

METHODS = ("fixed_point", "neumann", "cg")


def solve_stable_linear(matvec: MatVec,
                        b: PyTree,
                        *,
                        method: str = "fixed_point",
                        strategy: fp.Strategy = fp.Euler(),
                        rtol: float = 1e-5,
                        atol: float = 0.0,
                        max_steps: int = 200,
                        x0: PyTree | None = None) -> fp.FixedPointResult:
  """Solves ``A x = b`` for ``A`` stable (negative-definite for ``cg``).

  The residual reported is ``||A x - b||`` and the tolerance is relative to
  ``||b||`` (``||A x - b|| <= atol + rtol ||b||``).
  """
  if method not in METHODS:
    raise ValueError(f"unknown linear solve method {method!r}; use one of {METHODS}")
  x0 = tu.tree_zeros_like(b) if x0 is None else x0
  if method == "cg":
    neg = lambda v: tu.tree_scale(-1.0, matvec(v))
    return conjugate_gradient(neg, tu.tree_scale(-1.0, b), x0, rtol=rtol, atol=atol,
                              max_steps=max_steps)
  field = lambda x: tu.tree_sub(matvec(x), b)
  bnorm = tu.tree_norm(b)
  if method == "neumann":
    res = fp.unrolled_fixed_point(field, x0, strategy, num_steps=max_steps)
  else:
    # The engine's tolerance is relative to ||x||; restate it relative to ||b||
    # by folding rtol * ||b|| into atol.
    res = fp.solve_fixed_point(field, x0, strategy, rtol=0.0,
                               atol=atol + rtol * bnorm, max_steps=max_steps)
  return _linear_result(res.value, res.residual, res.iterations, bnorm, rtol, atol)


def _linear_result(x, residual, iterations, bnorm, rtol, atol) -> fp.FixedPointResult:
  finite = jnp.isfinite(residual)
  converged = finite & (residual <= atol + rtol * bnorm)
  status = jnp.where(converged, fp.Status.CONVERGED,
                     jnp.where(finite, fp.Status.MAX_STEPS, fp.Status.NONFINITE))
  rel = residual / jnp.maximum(bnorm, jnp.finfo(residual.dtype).tiny)
  return fp.FixedPointResult(x, jnp.asarray(iterations, jnp.int32), residual, rel,
                             converged, status.astype(jnp.int32))


def conjugate_gradient(matvec: MatVec, b: PyTree, x0: PyTree, *, rtol: float,
                       atol: float, max_steps: int) -> fp.FixedPointResult:
  """Conjugate gradients for symmetric positive-definite ``matvec``."""
  bnorm = tu.tree_norm(b)
  r0 = tu.tree_sub(b, matvec(x0))
  tol = atol + rtol * bnorm

  def cond(carry):
    k, _, r, _, rr = carry
    return (k < max_steps) & (jnp.sqrt(rr) > tol) & jnp.isfinite(rr)

  def body(carry):
    k, x, r, p, rr = carry
    ap = matvec(p)
    step = rr / tu.tree_vdot(p, ap)
    x = tu.tree_axpy(step, p, x)
    r = tu.tree_axpy(-step, ap, r)
    rr_new = tu.tree_vdot(r, r)
    p = tu.tree_axpy(rr_new / rr, p, r)
    return k + 1, x, r, p, rr_new

  init = (jnp.zeros((), jnp.int32), x0, r0, r0, tu.tree_vdot(r0, r0))
  k, x, _, _, _ = jax.lax.while_loop(cond, body, init)
  # Recompute the true residual: the recursive one drifts in float32.
  residual = tu.tree_norm(tu.tree_sub(matvec(x), b))
  return _linear_result(x, residual, k, bnorm, rtol, atol)
