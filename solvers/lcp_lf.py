"""``lcp_lf``: least control with direct linear feedback, eq. 13 (section 3.1.1).

Controlled dynamics (eq. 13), for one example:

    dphi/dt = f(phi) + P^T u + H^T (Q u),     du/dt = k_i (-grad_y L - alpha u),

where ``P^T`` puts the output controller ``u`` on the output units (as in every
output-controlled circuit, :func:`bilevel.least_control.direct_field`) and the
learned feedback ``Q`` (one ``[*unit_shape, n_out]`` leaf per hidden layer)
broadcasts it onto the hidden units ``H(phi)`` (the problem's
``feedback_units``). ``Q`` is the solver's learned state (``solver_params``
holds ``Q / q_scale``, see below).

Weight update (the paper's modified rule, option ``modulated``): with
``psi* = P^T u* + H^T(Q u*)`` at the controlled steady state and the problem's
``feedback_modulation`` ``m(phi) = sigma'(phi)`` (1 on linear units),

    dW = (m(phi*) * psi*) sigma(phi*)^T,   dU = (m(phi*) * psi*) x^T,

i.e. Theorem 1's ``-d_theta f^T psi`` evaluated with ``m * psi*`` in place of
``psi*`` (``modulated=False`` gives eq. 12 unmodified).

Learning Q (section 3.1.1; the details of the paper's S6 are not in our copy,
so here is the rule we implement and why -- it is the noise-driven feedback
rule of Deep Feedback Control, Meulemans et al. 2021/2022, as used in the
authors' public code). After the controlled equilibrium ``(phi*, u*)`` is
found, the circuit keeps running from it for ``noise_steps`` Euler steps with
Ornstein-Uhlenbeck noise ``eps`` added to the hidden feedback:

    v_fb  = Q u + sigma eps                          (what the hidden units receive)
    phi  <- phi + dt (f + P^T u + H^T v_fb)          on hidden units,
    phi  <- phi + dt' (f + P^T u + H^T v_fb)         on output units,
    u    <- u + dt' du/dt,                           dt' = dt / timescale_factor^2,
    eps  <- eps + (timescale_factor / tau_eps) (-dt' eps + sqrt(dt') xi),
    C    <- C - (1 / sigma^2) pre (u - u*)^T,        pre = v_fb - Q u* = Q (u - u*) + sigma eps

(hidden units are ``timescale_factor^2`` times faster than the output units
and the controller, so they track the noise quasi-statically; ``eps`` starts
``N(0, I)``). Then ``dQ = (dt / tau_Q) (mean_batch C - q_weight_decay Q)``.
The increments ``xi`` are independent +-1 signs rather than the authors'
Gaussians: the rule only uses second moments (below), the OU filter makes
``eps`` nearly Gaussian anyway, and 32 signs come from one random word, which
makes the noisy phase several times cheaper than drawing normals.

Why it satisfies the column-space condition for one sample: linearise around
the steady state. The noise moves the outputs through ``M = -[d out/d hidden]
(d_h f)^{-1}`` (the map from a hidden perturbation to the output units), and
the controller responds with ``du = u - u*``, a filtered ``-H_L M sigma eps``.
``E[C] = -(1/sigma^2) (Q Cov[du] + sigma Cov[eps, du])``: the rule is
stochastic gradient descent on ``E||Q du + sigma eps||^2`` (the feedback learns
to predict -- and cancel -- the noise from the controller's response), whose
minimiser is the regression ``Q = -sigma Cov[eps, du] Cov[du]^{-1}``. Every
column of ``Cov[eps, du]`` lies in ``col(M^T)`` (the noise reaches ``u`` only
through ``M``), hence ``col(Q) = col(M^T) = row([0, Id] (d_phi f)^{-1})``
restricted to the hidden units -- the condition of eq. 7 / section 3.1.1. The
decay removes directions ``u`` never visits (for softmax cross-entropy, the
all-ones output direction). ``tests/test_lcp_lf.py`` checks it on one sample.

Presynaptic factor (option ``presynaptic``): the authors' code multiplies by
the whole feedback ``v_fb = Q u* + Q du + sigma eps``. Under noise the
nonlinear network's mean shifts, ``E[du] = O(sigma^2)``, so ``-(1/sigma^2) Q u*
E[du]^T`` is an O(1) bias independent of sigma that is not part of the
regression above; on one sample with a sizeable ``u*`` we saw it grow ``Q``
without bound. The default ``'deviation'`` uses ``v_fb - Q u*`` (the feedback's
deviation from its steady-state value, i.e. high-pass filtered as in DFC,
which high-pass filters the controller signal for the same reason);
``'feedback'`` reproduces the authors' code.

How Q is applied: the solver state is ``S = Q / q_scale`` and ``solver_grads
= -dQ / q_scale``, so the training loop's optimizer applies the rule: plain SGD
with learning rate 1 reproduces it exactly for any ``q_scale``. With Adam (the
optimizer of our configs, shared with the weights) the fixed point of the rule
is the same but the step is ~``q_scale * learning_rate`` per entry whatever the
size of ``dQ``: with ``q_scale = 1`` that is orders of magnitude faster than the
authors' rule (``dt / tau_Q = 1e-5`` per step, about 1e-6 per entry) and on
MNIST-FF it shrank Q 10x within 15 epochs while the test accuracy fell; the
configs use ``q_scale = 1e-3``, which gives Adam the authors' step size.

Noise keys: the solver interface has no PRNG key, so the noise of each
example is keyed by ``noise_seed`` folded with a hash of ``Q`` (which changes
every step), of the example and its position in the (local) batch:
deterministic, different across examples and steps. (A ``key`` argument on
``Solver.__call__`` would be cleaner.)

Problems must provide ``feedback_units(state)`` and ``feedback_modulation(state)``
(e.g. :class:`problems.mnist.EquilibriumNetProblem`).
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
from solvers.base import GradientEstimate, relaxation_stats
from solvers.lcp import LeastControl

PyTree = Any
HOOKS = ("feedback_units", "feedback_modulation")


def _content_hash(tree: PyTree) -> jax.Array:
  """A uint32 hash of a pytree's values (for keying noise; not cryptographic)."""
  flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])
  weights = jnp.sin(jnp.arange(flat.size, dtype=jnp.float32) * 12.9898 + 0.5)
  return jax.lax.bitcast_convert_type(jnp.sum(flat * weights), jnp.uint32)


@dataclasses.dataclass(frozen=True)
class LinearFeedback(LeastControl):
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
    missing = [h for h in HOOKS if getattr(problem, h, None) is None]
    if missing:
      raise ValueError(
          f"solver 'lcp_lf' needs the problem to expose {', '.join(missing)} (the hidden "
          f"units Q feeds back to, and sigma'(phi)); {problem.name!r} does not. Use a "
          "problems.mnist.EquilibriumNetProblem-like problem, or another solver "
          "(lcp_di, lcp_direct).")
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
    units = problem.feedback_units(state)
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

  def __call__(self, problem: BilevelProblem, params: PyTree, solver_params: PyTree,
               batch: PyTree) -> GradientEstimate:
    self._check(problem)
    q = self.q_of(solver_params)
    free = self.free_equilibrium(problem, params, batch)
    field = lambda ex: self.field(problem, params, solver_params, ex)

    def controlled_equilibrium(phi, example):
      res = self.controlled.solve(field(example), self.initial_state(problem, phi, example))
      psi = self.control(problem, params, solver_params, res.value, example)
      violation = tu.tree_norm(tu.tree_add(problem.f(params, res.value.phi, example), psi))
      return res, psi, violation

    res, psi, violation = jax.vmap(controlled_equilibrium)(free.value, batch)
    signal = psi
    if self.modulated:
      signal = jax.tree.map(jnp.multiply, jax.vmap(problem.feedback_modulation)(res.value.phi),
                            psi)
    grads = lc.least_control_update(problem, params, res.value.phi, signal, batch)

    stats = {}
    if self.learn_q:
      base = jax.random.fold_in(jax.random.key(self.noise_seed), _content_hash(q))
      size = jax.tree.leaves(batch)[0].shape[0]
      keys = jax.vmap(lambda ex, i: jax.random.fold_in(
          jax.random.fold_in(base, _content_hash(ex)), i))(batch, jnp.arange(size))
      c = jax.vmap(lambda z, ex, k: self.hebbian_statistics(problem, params, q, z, ex, k))(
          res.value, batch, keys)
      solver_grads = tu.tree_scale(-1.0 / self.q_scale,
                                   self.q_update(q, tu.tree_mean_over_batch(c)))
      stats["lf/hebbian_norm"] = jax.vmap(tu.tree_norm)(c)
    else:
      solver_grads = tu.tree_zeros_like(solver_params)
    stats["lf/q_norm"] = jnp.broadcast_to(tu.tree_norm(q), (jax.tree.leaves(batch)[0].shape[0],))

    loss, outputs = self.batch_loss(problem, free.value, batch)
    stats.update({**relaxation_stats("free", free), **relaxation_stats("controlled", res),
                  "psi_norm": jax.vmap(tu.tree_norm)(psi), "constraint_violation": violation,
                  "controlled_loss": jax.vmap(problem.outer_loss)(res.value.phi, batch)})
    return GradientEstimate(grads, solver_grads, loss, outputs, stats)
