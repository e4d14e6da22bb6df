"""``lcp_lf``: least control with direct linear feedback, eq. 13 (section 3.1.1).

Controlled dynamics ``dphi/dt = f(phi) + P^T u + H^T (Q u)`` with the output
controller of eq. 6; the update is Theorem 1's (eq. 4) with ``sigma'(phi*) psi*``
in place of ``psi*`` (option ``modulated``). ``Q`` (the solver state, stored as
``Q / q_scale``) is learned by a noise-driven rule that satisfies the
column-space condition of eq. 7. Derivation, choices and measurements:
``docs/lcp_lf.md``. Needs the problem hooks ``feedback_units`` and
``feedback_modulation`` (see :class:`bilevel.problem.BilevelProblem`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel import least_control as lc
from bilevel import tree as tu
from bilevel.problem import BilevelProblem

PyTree = Any
HOOKS = {"feedback_units": "the hidden units Q feeds back to",
         "feedback_modulation": "sigma'(phi) of the modified update"}


@dataclasses.dataclass(frozen=True)
class LinearFeedback(lc.LeastControl):
  """``lcp_lf``: eq. 13 with Q learned by the noise-driven rule (module docstring)."""
  name: ClassVar[str] = "lcp_lf"

  modulated: bool = True  # dW = sigma'(phi*) Q u* sigma(phi*)^T (the paper's variant)
  q_init_scale: float = 1.0  # Q ~ N(0, q_init_scale^2 / n_out)
  learn_q: bool = True
  sigma: float = 0.01  # noise amplitude
  tau_q: float = 1e5
  q_weight_decay: float = 0.01
  timescale_factor: float = 5.0
  tau_eps: float = 1.0
  noise_dt: float = 1.0
  noise_steps: int = 800
  noise_seed: int = 0
  presynaptic: str = "deviation"  # or "feedback" (the authors' code; see docstring)
  q_scale: float = 1.0  # solver state is Q / q_scale (see "How Q is applied")

  # ----- structure ------------------------------------------------------------

  @staticmethod
  def _check(problem: BilevelProblem) -> None:
    for hook, why in HOOKS.items():
      problem.require(hook, "lcp_lf", why)
    if problem.example is None:
      raise ValueError(f"solver 'lcp_lf' needs {problem.name!r} to carry an `example` "
                       "(to size Q)")

  def init(self, problem, params, key):
    super().init(problem, params, key)
    self._check(problem)
    if self.presynaptic not in ("deviation", "feedback"):
      raise ValueError(f"presynaptic must be 'deviation' or 'feedback', got {self.presynaptic!r}")
    if not self.q_scale > 0:
      raise ValueError(f"q_scale must be > 0, got {self.q_scale}")
    state = jax.eval_shape(problem.init_state, params, problem.example)
    n_out = sum(math.prod(x.shape) for x in jax.tree.leaves(jax.eval_shape(problem.output, state)))
    # Abstract evaluation: the hook may index the state, which a ShapeDtypeStruct
    # does not support.
    units = jax.eval_shape(problem.feedback_units, state)
    leaves, treedef = jax.tree.flatten(units)
    keys = jax.random.split(key, max(len(leaves), 1))
    scale = self.q_init_scale / math.sqrt(n_out)
    dtype = jax.tree.leaves(params)[0].dtype
    q = [scale / self.q_scale * jax.random.normal(k, leaf.shape + (n_out,), dtype)
         for k, leaf in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, q)

  def feedback(self, problem: BilevelProblem, q: PyTree):
    """``feedback(phi, u_c) -> P^T u_c + H^T (Q u_c)`` for eq. 13."""

    def hidden_feedback(phi, v_hidden):
      _, embed = jax.vjp(problem.feedback_units, phi)
      return embed(v_hidden)[0]

    def fb(phi, control):
      c = ravel_pytree(control)[0]
      qu = jax.tree.map(lambda qq: qq @ c, q)
      return tu.tree_add(problem.output_adjoint(phi, control), hidden_feedback(phi, qu))

    return fb, hidden_feedback

  def q_of(self, solver_params: PyTree) -> PyTree:
    """The feedback weights Q from the solver state ``S = Q / q_scale``."""
    return tu.tree_scale(self.q_scale, solver_params)

  def field(self, problem, params, solver_params, example):
    fb, _ = self.feedback(problem, self.q_of(solver_params))
    return lc.direct_field(problem, params, example, self.controller, feedback=fb)

  def control(self, problem, params, solver_params, z, example):
    _, control = self.controller(problem, z.phi, z.u, example)
    return self.feedback(problem, self.q_of(solver_params))[0](z.phi, control)

  # ----- Q learning -------------------------------------------------------------

  def hebbian_statistics(self, problem: BilevelProblem, params: PyTree, q: PyTree,
                         z_star: lc.OutputControlledState, example: PyTree,
                         key: jax.Array) -> PyTree:
    """``C`` of the module docstring for one example (pytree like Q): the noisy
    relaxation from the controlled steady state ``z_star``."""
    _, hidden_feedback = self.feedback(problem, q)
    controller = self.controller
    _, control_star = controller(problem, z_star.phi, z_star.u, example)
    c_star = ravel_pytree(control_star)[0]
    tf2 = self.timescale_factor ** 2
    dt, dt_slow = self.noise_dt, self.noise_dt / tf2
    hidden_mask = hidden_feedback(z_star.phi, jax.tree.map(
        jnp.ones_like, problem.feedback_units(z_star.phi)))
    step_size = jax.tree.map(lambda m: dt * m + dt_slow * (1.0 - m), hidden_mask)
    eps_decay = self.timescale_factor / self.tau_eps
    units = problem.feedback_units(z_star.phi)
    flat_units, unravel_units = ravel_pytree(units)
    n = flat_units.shape[0]
    k0, k1 = jax.random.split(key)
    eps0 = unravel_units(jax.random.normal(k0, (n,), flat_units.dtype))
    # Noise increments: +-1 (zero mean, unit variance), 32 per random word.
    words = jax.random.bits(k1, (self.noise_steps, -(-n // 32)), jnp.uint32)
    shifts = jnp.arange(32, dtype=jnp.uint32)

    def step(carry, word):
      phi, u, eps = carry
      du, control = controller(problem, phi, u, example)
      cflat = ravel_pytree(control)[0]
      v_fb = jax.tree.map(lambda qq, e: qq @ cflat + self.sigma * e, q, eps)
      dphi = tu.tree_add(tu.tree_add(problem.f(params, phi, example),
                                     problem.output_adjoint(phi, control)),
                         hidden_feedback(phi, v_fb))
      phi = jax.tree.map(lambda p, s, d: p + s * d, phi, step_size, dphi)
      u = tu.tree_axpy(dt_slow, du, u)
      bits = ((word[:, None] >> shifts) & 1).reshape(-1)[:n]
      noise = unravel_units(2.0 * bits.astype(flat_units.dtype) - 1.0)
      eps = jax.tree.map(lambda e, xi: e + eps_decay * (-dt_slow * e + math.sqrt(dt_slow) * xi),
                         eps, noise)
      delta = cflat - c_star
      pre = (v_fb if self.presynaptic == "feedback" else
             jax.tree.map(lambda qq, e: qq @ delta + self.sigma * e, q, eps))
      return (phi, u, eps), (pre, delta)

    def chunk(carry, words_chunk):
      # A chunk of steps, then C += -(1/sigma^2) sum_t pre(t) (u(t) - u*)^T in one matmul.
      state, c = carry
      state, (pre, delta) = jax.lax.scan(step, state, words_chunk)
      c = jax.tree.map(lambda cc, v: cc - jnp.tensordot(v, delta, axes=(0, 0)) / self.sigma ** 2,
                       c, pre)
      return (state, c), None

    size = max(d for d in range(1, 65) if self.noise_steps % d == 0)
    words = words.reshape(self.noise_steps // size, size, -1)
    c0 = jax.tree.map(jnp.zeros_like, q)
    (_, c), _ = jax.lax.scan(chunk, ((z_star.phi, z_star.u, eps0), c0), words)
    return c

  def q_update(self, q: PyTree, hebbian_mean: PyTree) -> PyTree:
    """``dQ = (dt / tau_Q) (mean_batch C - q_weight_decay Q)``."""
    return jax.tree.map(lambda c, qq: (self.noise_dt / self.tau_q) * (c - self.q_weight_decay * qq),
                        hebbian_mean, q)

  # ----- the step ---------------------------------------------------------------

  def signal(self, problem, phi_star, psi):
    """``m(phi*) * psi*`` (the paper's modified rule) or psi* (eq. 12)."""
    if not self.modulated:
      return psi
    return jax.tree.map(jnp.multiply, jax.vmap(problem.feedback_modulation)(phi_star), psi)

  def learn(self, problem, params, solver_params, batch, res, mask, key):
    """``-dQ / q_scale`` from the noisy phase after the controlled equilibrium."""
    q = self.q_of(solver_params)
    size = jax.tree.leaves(batch)[0].shape[0]
    extras = {}
    if self.learn_q:
      keys = jax.random.split(jax.random.fold_in(key, self.noise_seed), size)
      c = jax.vmap(lambda z, ex, k: self.hebbian_statistics(problem, params, q, z, ex, k))(
          res.value, batch, keys)
      solver_grads = tu.tree_scale(-1.0 / self.q_scale, self.q_update(q, mask.mean(c)))
      extras["lf/hebbian_norm"] = jax.vmap(tu.tree_norm)(c)
    else:
      solver_grads = tu.tree_zeros_like(solver_params)
    extras["lf/q_norm"] = jnp.broadcast_to(tu.tree_norm(q), (size,))
    return solver_grads, extras

  def gradient(self, problem, params, solver_params, batch, free, mask, key):
    self._check(problem)
    return super().gradient(problem, params, solver_params, batch, free, mask, key)
