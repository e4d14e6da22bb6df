"""The one way to state a bilevel problem: inner equilibrium + outer objective.

A problem (eq. 1) is

    min_theta  L(y(phi*))   s.t.   f(phi*, theta, x) = 0,

given by a handful of functions, all written for ONE example ``x`` (a data
point, or a meta-learning task); the solvers vmap them over a batch:

* ``dynamics(params, state, example) -> dstate`` -- the vector field ``f``
  whose zero is the inner equilibrium (same pytree as ``state``); or
* ``energy(params, state, example) -> scalar`` -- an inner objective ``E``, in
  which case ``f = -grad_state E`` (this enables CG adjoints and contrastive
  solvers);
* ``loss(output, example) -> scalar`` -- the outer loss ``L``;
* ``output(state) -> output`` -- the output units ``y`` read by ``L`` (default:
  the whole state, as in meta-learning, eq. 16);
* ``init_state(params, example) -> state`` -- where relaxations start;
* ``init_params(key, example) -> params`` -- parameter initialisation (optional,
  used by the training loop);
* ``metrics(output, example) -> dict`` -- extra per-example scores (optional).

Optional hooks that only some solvers need (``None`` unless given; a solver
that needs one says so with a clear error):

* ``feedback_units(state) -> pytree`` -- the hidden units a learned direct
  linear feedback ``Q`` projects onto (eq. 13, ``lcp_lf``); a linear selection
  of the state.
* ``feedback_modulation(state) -> pytree like state`` -- ``sigma'(phi)`` on
  units read through ``sigma`` and 1 on linear units (``lcp_lf``'s modified
  update ``dW = sigma'(phi) Q u sigma(phi)^T``).

Nothing here mentions a solver: every solver in ``solvers/`` works on any
problem through the derived quantities below (VJPs of f, the output adjoint).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from bilevel import tree as tu

PyTree = Any


class ProblemError(ValueError):
  """A problem definition is inconsistent (raised outside jit, before tracing)."""


@dataclasses.dataclass(frozen=True, eq=False)
class BilevelProblem:
  """An inner equilibrium plus an outer objective; see the module docstring.

  If ``example`` (one example) and ``init_params`` are given, the problem is
  checked at construction with abstract evaluation: ``f`` must return the same
  pytree (structure and shapes) as the state, and the loss must be a scalar.
  """
  loss: Callable[[PyTree, PyTree], jax.Array]
  init_state: Callable[[PyTree, PyTree], PyTree]
  dynamics: Optional[Callable[[PyTree, PyTree, PyTree], PyTree]] = None
  energy: Optional[Callable[[PyTree, PyTree, PyTree], jax.Array]] = None
  output: Callable[[PyTree], PyTree] = lambda state: state
  init_params: Optional[Callable[[jax.Array, PyTree], PyTree]] = None
  metrics: Optional[Callable[[PyTree, PyTree], dict]] = None
  name: str = "problem"
  example: Any = None
  feedback_units: Optional[Callable[[PyTree], PyTree]] = None
  feedback_modulation: Optional[Callable[[PyTree], PyTree]] = None

  def require(self, hook: str, solver: str, why: str) -> Callable:
    """The optional hook ``hook``, or a ValueError naming ``solver`` and ``why``."""
    value = getattr(self, hook)
    if value is None:
      raise ValueError(f"solver {solver!r} needs the problem to give `{hook}` ({why}); "
                       f"{self.name!r} does not. Give it (see BilevelProblem's "
                       "docstring) or use another solver.")
    return value

  def __post_init__(self):
    if (self.dynamics is None) == (self.energy is None):
      raise ProblemError(f"{self.name}: give exactly one of `dynamics` (the field f) "
                         "or `energy` (an inner objective E with f = -grad E)")
    if self.example is not None and self.init_params is not None:
      params = jax.eval_shape(self.init_params, jax.random.key(0), self.example)
      self.validate(params, self.example)

  # ----- the quantities solvers use ------------------------------------------

  @property
  def has_energy(self) -> bool:
    return self.energy is not None

  def f(self, params: PyTree, state: PyTree, example: PyTree) -> PyTree:
    """The inner dynamics ``f(phi, theta)`` (eq. 1); ``-grad E`` for energies."""
    if self.dynamics is not None:
      return self.dynamics(params, state, example)
    grad = jax.grad(self.energy, argnums=1)(params, state, example)
    return tu.tree_scale(-1.0, grad)

  def outer_loss(self, state: PyTree, example: PyTree) -> jax.Array:
    """``L(y(phi))``, the outer loss as a function of the whole state."""
    return self.loss(self.output(state), example)

  def loss_grad(self, state: PyTree, example: PyTree) -> PyTree:
    """``grad_phi L``: the output error mapped back onto the state's shape."""
    return jax.grad(self.outer_loss)(state, example)

  def output_error(self, state: PyTree, example: PyTree) -> PyTree:
    """``grad_y L`` on the output units (the input of the output controller, eq. 6)."""
    return jax.grad(self.loss)(self.output(state), example)

  def output_adjoint(self, state: PyTree, v: PyTree) -> PyTree:
    """``P^T v``: embeds an output-shaped vector into the state (the map
    ``[0, Id]^T`` of eq. 7 for a linear read-out)."""
    _, vjp = jax.vjp(self.output, state)
    return vjp(v)[0]

  def state_vjp(self, params: PyTree, state: PyTree, example: PyTree,
                v: PyTree) -> PyTree:
    """``d_phi f(phi, theta)^T v``."""
    _, vjp = jax.vjp(lambda s: self.f(params, s, example), state)
    return vjp(v)[0]

  def params_vjp(self, params: PyTree, states: PyTree, batch: PyTree,
                 cotangents: PyTree, count: Optional[int] = None) -> PyTree:
    """``(1/B) sum_i d_theta f(phi_i, theta)^T c_i`` over a batch, as ONE VJP.

    ``states``, ``batch`` and ``cotangents`` carry a leading batch axis B.
    ``count=1`` returns the plain sum (callers that drop examples divide).
    """
    batched_f = jax.vmap(self.f, in_axes=(None, 0, 0))
    _, vjp = jax.vjp(lambda p: batched_f(p, states, batch), params)
    summed = vjp(cotangents)[0]
    if count == 1:
      return summed
    size = jax.tree.leaves(cotangents)[0].shape[0] if count is None else count
    return tu.tree_scale(1.0 / size, summed)

  # ----- checks -------------------------------------------------------------

  def validate(self, params: PyTree, example: PyTree) -> None:
    """Raises :class:`ProblemError` with a readable message if shapes disagree.

    Uses ``jax.eval_shape`` only: nothing is computed or compiled.
    """
    try:
      state = jax.eval_shape(self.init_state, params, example)
    except Exception as e:  # noqa: BLE001 -- re-raised with context
      raise ProblemError(f"{self.name}: init_state(params, example) failed: {e}") from e
    try:
      dstate = jax.eval_shape(self.f, params, state, example)
    except Exception as e:  # noqa: BLE001
      raise ProblemError(f"{self.name}: dynamics(params, state, example) failed: {e}") from e
    ok, why = tu.same_structure(state, dstate)
    if not ok:
      raise ProblemError(
          f"{self.name}: dynamics must return a pytree like the state (phi) it is "
          f"given, but {why}. Fix the dynamics so f(phi) has phi's structure.")
    try:
      loss = jax.eval_shape(self.outer_loss, state, example)
    except Exception as e:  # noqa: BLE001
      raise ProblemError(f"{self.name}: loss(output(state), example) failed: {e}") from e
    if jnp.shape(loss) != ():
      raise ProblemError(f"{self.name}: the loss must return a scalar for one "
                         f"example, got shape {jnp.shape(loss)}")
