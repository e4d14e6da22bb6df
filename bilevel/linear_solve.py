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

All return the residual ``||A x - b||`` and a status judged by the engine's
per-block rule (see :func:`solve_stable_linear`), and never raise inside jit.
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
                        x0: PyTree | None = None,
                        block_floor: float = fp.BLOCK_FLOOR) -> fp.FixedPointResult:
  """Solves ``A x = b`` for ``A`` stable (negative-definite for ``cg``).

  Converged iff every block of the residual ``r = A x - b`` meets
  ``||r_b|| <= atol + rtol * max(||x_b||, block_floor ||x||)``: the engine's rule
  (:func:`bilevel.fixed_point.block_tolerance_check`) for the adjoint dynamics
  ``dx/dt = A x - b``, whose state is x and whose field is r. Blocks of b are no
  scale: for eq. 5, ``b = -grad_phi L`` vanishes on every hidden block. The
  reported ``relative_residual`` is ``||r|| / ||b||``.
  """
  if method not in METHODS:
    raise ValueError(f"unknown linear solve method {method!r}; use one of {METHODS}")
  x0 = tu.tree_zeros_like(b) if x0 is None else x0
  tols = {"rtol": rtol, "atol": atol, "block_floor": block_floor}
  if method == "cg":
    neg = lambda v: tu.tree_scale(-1.0, matvec(v))
    return conjugate_gradient(neg, tu.tree_scale(-1.0, b), x0, max_steps=max_steps, **tols)
  field = lambda x: tu.tree_sub(matvec(x), b)
  if method == "neumann":
    res = fp.unrolled_fixed_point(field, x0, strategy, num_steps=max_steps, **tols)
  else:
    res = fp.solve_fixed_point(field, x0, strategy, max_steps=max_steps, **tols)
  bnorm = tu.tree_norm(b)
  return res._replace(
      relative_residual=res.residual / jnp.maximum(bnorm, jnp.finfo(bnorm.dtype).tiny))


def solve_stable_linear_batch(make_matvec: Callable[[PyTree], MatVec], inputs: PyTree,
                              b: PyTree, relaxation, *,
                              method: str = "fixed_point") -> fp.FixedPointResult:
  """:func:`solve_stable_linear` for a batch: ``make_matvec(inputs_i)`` is example i's
  ``A``, ``b`` the right-hand sides ``[B, ...]``; strategy, tolerances and budget from
  ``relaxation`` (a :class:`bilevel.relaxation.Relaxation`), whose ``solve_batch``
  (and so its compaction) runs the ``fixed_point`` method."""
  if method != "fixed_point":
    return jax.vmap(lambda i, bi: solve_stable_linear(
        make_matvec(i), bi, method=method, strategy=relaxation.strategy,
        rtol=relaxation.rtol, atol=relaxation.atol, max_steps=relaxation.max_steps,
        block_floor=relaxation.block_floor))(inputs, b)
  res = relaxation.solve_batch(
      lambda ib: lambda x: tu.tree_sub(make_matvec(ib[0])(x), ib[1]), (inputs, b),
      tu.tree_zeros_like(b))
  bnorm = jax.vmap(tu.tree_norm)(b)
  return res._replace(
      relative_residual=res.residual / jnp.maximum(bnorm, jnp.finfo(bnorm.dtype).tiny))


def conjugate_gradient(matvec: MatVec, b: PyTree, x0: PyTree, *, rtol: float,
                       atol: float, max_steps: int,
                       block_floor: float = fp.BLOCK_FLOOR) -> fp.FixedPointResult:
  """Conjugate gradients for symmetric positive-definite ``matvec``.

  Stops when the recursive residual meets the per-block rule of
  :func:`solve_stable_linear`; the flag is then re-judged on the true residual
  ``b - A x``, which the recursion drifts away from in float32.
  """
  r0 = tu.tree_sub(b, matvec(x0))
  tols = {"rtol": rtol, "atol": atol, "block_floor": block_floor}

  def cond(carry):
    k, x, r, _, rr = carry
    met, _ = fp.block_tolerance_check(fp.block_norms(r), fp.block_norms(x), **tols)
    return (k < max_steps) & ~met & jnp.isfinite(rr)

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
  residual = tu.tree_sub(matvec(x), b)
  return fp.make_result(x, fp.block_norms(residual), fp.block_norms(x), k,
                        whole_scale=tu.tree_norm(b), initial_residual=tu.tree_norm(r0),
                        **tols)
