"""Omniglot few-shot meta-learning with complex synapses (section 3.2, Table 3).

``python launch/run.py --config omniglot`` -- the paper-scale 20-way 1-shot
protocol, with the CML authors' recipe (Zucchet et al. 2022, Omniglot 20-way
1-shot): conv-4 with 64 channels and per-task batch norm, meta-batch 16,
30 epochs x 125 meta-batches, inner loop SGD (lr 0.01, Nesterov momentum 0.9,
fresh momentum per phase) for 200 steps on L_learn + lambda/2 ||phi - omega||^2
with lambda = 0.5, 15 query images per class, outer Adam lr 0.01 halved every
5 epochs, uniform Polyak averaging from epoch 4, meta-test on 600 test-split
tasks plus the 20 official one-shot runs. CML: beta = 0.03, symmetric, 100
steps per nudged phase. Choose the solver with ``--config.solver=NAME``
(lcp, imaml, cml, rbp, t1t2, fomaml, reptile, bp); every one has its options
under ``solvers.NAME`` and shares the same inner loop (``free``).

``--config omniglot:quick`` -- the same 20-way 1-shot protocol shrunk to run in
under 10 minutes on a 2-core CPU (50 inner steps at a larger
learning rate, 16 channels, 4 tasks per meta-batch, 1 query image per class
for training, 100 meta-steps, 100 meta-test tasks): its numbers are a smoke test
of every solver, not the paper's.

``--config omniglot:test`` -- a tiny 5-way instance for the test-suite.
"""

import ml_collections

from configs.base import base_config, optimizer_config


def _sgd(lr: float, steps: int, rtol: float, steps_per_check: int = 1,
         momentum: float = 0.9, restart: bool = False) -> dict:
  """Heavy-ball relaxation: optax.sgd fed -f as gradient (the CML inner loop), or with
  ``restart`` the same Nesterov step with adaptive restart and per-task step control
  (bilevel.fixed_point.RestartingNesterov; same fixed points)."""
  if restart:
    return dict(strategy="restarting_nesterov",
                strategy_options=dict(learning_rate=lr, momentum=momentum),
                rtol=rtol, max_steps=steps, steps_per_check=steps_per_check)
  return dict(strategy="sgd",
              strategy_options=dict(learning_rate=lr, momentum=momentum,
                                    nesterov=momentum > 0),
              rtol=rtol, max_steps=steps, steps_per_check=steps_per_check)


# The smooth net's inner loop (docs/omniglot.md): the protocol's learning rate with
# Nesterov momentum 0.95 converges linearly on the softplus / average-pool net
# (E smooth, curvature bounded); momentum 0.9 needs about twice the steps. Adaptive
# restart keeps it converging at meta-trained omegas, where the curvature outgrows
# the fixed step (3 of 8 held-out tasks oscillate without it).
SMOOTH_MOMENTUM = 0.95
STRONG_ALPHA = 0.1


def _free(net: str, lr: float, steps: int, rtol: float, spc: int) -> dict:
  """The inner loop (eq. 16's arg min): heavy-ball SGD on E from phi = omega.

  ``maxpool``: the CML recipe's rule (Nesterov 0.9); it stalls at a gradient-norm
  floor (kinks), so ``steps`` is a budget, not a convergence time. ``smooth``:
  momentum 0.95 with adaptive restart, ``steps`` sized to converge (>= 95% of tasks,
  docs/omniglot.md).
  """
  if net == "smooth":
    return _sgd(lr, steps, rtol, spc, momentum=SMOOTH_MOMENTUM, restart=True)
  return _sgd(lr, steps, rtol, spc)


def _strong_controlled(lr: float, momentum: float, phase_steps: int, rtol: float,
                       spc: int, restart: bool) -> dict:
  """Integrator of eq. 17's steady state in the strong-control regime.

  Route ``reduced`` (bilevel/controlled_solve.py): u is held at the controller's
  steady state -grad L_eval / alpha, so the phase is heavy-ball descent on
  E + L_eval / alpha -- the free phase's rule, with the step scaled by
  alpha / 0.5 for the 1 / alpha curvature of the query loss. Measured on 5-way
  tasks (4-channel smooth net, float64, docs/omniglot.md section 3): at alpha = 0.1
  it brings the relative residual to 1e-6 and 6e-6 on two tasks within 3,000 steps
  where Anderson on the joint (phi, u) dynamics stalls at 0.03-0.1; the preset
  budgets below are far shorter, so the phase's converged fraction and residual
  reduction are reported.
  """
  return _sgd(controlled_learning_rate(lr, STRONG_ALPHA), 4 * phase_steps, rtol, spc,
              momentum=momentum, restart=restart)


def controlled_learning_rate(lr: float, alpha: float) -> float:
  """The reduced controlled phase's step at strength alpha: the free phase's ``lr``,
  scaled down for the curvature of L_eval / alpha once that dominates E's."""
  return lr * min(1.0, alpha / 0.5)


def _lcp(lr: float, momentum: float, phase_steps: int, rtol: float, spc: int,
         weak: bool, restart: bool) -> dict:
  """LCP (eqs. 17-18) controlled-phase options: strong control by default, weak on request.

  Weak control (``+weak_lcp``): alpha = 10, k_i = 0.1 (k_i alpha = 1), plain
  gradient steps for 2 x phase_steps: u ~ -grad L_eval / alpha, so d omega =
  lambda u is FOMAML scaled by lambda / alpha read at a slightly nudged state
  (the pre-issue-11 default; quick-preset test accuracy 23.3%, table3_omniglot.md).
  """
  if weak:
    return dict(alpha=10.0, k_i=0.1, k_p=0.0,
                controlled=_sgd(min(5 * lr, 0.05), 2 * phase_steps, rtol, spc, momentum=0.0))
  return dict(alpha=STRONG_ALPHA, k_i=1.0 / STRONG_ALPHA, k_p=0.0, controlled_solve="reduced",
              controlled=_strong_controlled(lr, momentum, phase_steps, rtol, spc, restart))


def _solvers(lr: float, free_steps: int, phase_steps: int, lam: float, rtol: float,
             spc: int, cg_steps: int, net: str = "maxpool",
             weak_lcp: bool = False) -> ml_collections.ConfigDict:
  """Options of every solver, all on the same inner loop ``free``."""
  free = _free(net, lr, free_steps, rtol, spc)
  momentum = free["strategy_options"]["momentum"]
  # On the smooth net every phase is a descent on a smooth energy (E +- beta L,
  # E + L / alpha, the adjoint's quadratic): all take the free phase's restarting rule.
  restart = net == "smooth"
  phase = _sgd(lr, phase_steps, rtol, spc, momentum=momentum, restart=restart)
  s = ml_collections.ConfigDict()
  # eq. 17 from the free equilibrium: d phi = f + u, du = k_i (-grad L_eval - alpha u);
  # strong control by default (see _lcp and docs/omniglot.md).
  s.lcp = dict(free=free, **_lcp(lr, momentum, phase_steps, rtol, spc, weak_lcp, restart))
  s.imaml = dict(free=free, adjoint=dict(rtol=1e-3, max_steps=cg_steps))
  s.rbp = dict(free=free, adjoint_method="fixed_point",
               adjoint=_sgd(lr, 2 * phase_steps, 1e-3, spc, restart=restart))
  s.cml = dict(free=free, beta=0.03, symmetric=True, nudged=phase)
  s.t1t2 = dict(free=free, step_size=lr)
  s.fomaml = dict(free=free)
  # Reptile adapts on support and query (query_weight 1); step_size 1/lambda.
  s.reptile = dict(free=free, query_weight=1.0, step_size=1.0 / lam)
  s.bp = dict(free=free, num_steps=free["max_steps"])
  return s


PRESETS = ("default", "quick", "cpu", "test")
MODIFIERS = ("smooth", "weak_lcp")
# Inner-loop budget of the smooth net per preset (early stopping at rtol): measured
# to converge >= 95% of tasks (docs/omniglot.md); the max-pool net keeps the recipe's.
SMOOTH_FREE_STEPS = {"default": 1000, "quick": 500, "cpu": 500, "test": 6}


def _parse(preset: str | None) -> tuple[str, str, bool]:
  """``"quick+smooth+weak_lcp"`` -> ("quick", "smooth", True): one size, optional tokens."""
  tokens = [t for t in (preset or "").split("+") if t]
  unknown = [t for t in tokens if t not in PRESETS + MODIFIERS]
  sizes = [t for t in tokens if t in PRESETS]
  if unknown or len(sizes) > 1:
    raise ValueError(f"unknown preset {preset!r}; valid: one of {', '.join(PRESETS)} "
                     f"optionally joined with '+' to any of {', '.join(MODIFIERS)} "
                     "(e.g. 'quick+smooth')")
  return (sizes[0] if sizes else "default", "smooth" if "smooth" in tokens else "maxpool",
          "weak_lcp" in tokens)


def _quick(c: ml_collections.ConfigDict, lam: float, net: str, weak: bool) -> None:
  """Smoke test < 10 min on 2 cores: 16 channels, 2 query images per class (was 1; the
  strong-control phase costs ~ its image count, so 5 would overrun the budget)."""
  c.problem_options.update(dict(channels=16, n_query=2, eval_n_query=5, eval_tasks=100,
                                eval_batch_size=20, steps_per_epoch=25))
  steps = SMOOTH_FREE_STEPS["quick"] if net == "smooth" else 50
  c.solvers = _solvers(lr=0.01, free_steps=steps, phase_steps=25, lam=lam, rtol=1e-4,
                       spc=5, cg_steps=5, net=net, weak_lcp=weak)
  c.batch_size = 4
  c.num_epochs = 2
  c.optimizer.update(dict(learning_rate=0.005, decay_every_epochs=1, polyak_start_epoch=-1))
  c.log_every_steps = 10
  c.eval_every_epochs = 0
  c.checkpoint_every_steps = 50


def _cpu(c: ml_collections.ConfigDict, lam: float, net: str, weak: bool) -> None:
  """Table 3 on 2 CPU cores (<= 15 min per solver and seed): 5-way 1-shot, 15 query
  images per class, the recipe's inner lr 0.01 and uniform Polyak averaging; fewer
  channels (16), tasks per meta-batch (4), meta-steps (2 x 50) and nudged steps (25)."""
  c.problem_options.update(dict(n_way=5, channels=16, n_query=15, eval_n_query=15,
                                eval_tasks=600, eval_batch_size=50, steps_per_epoch=50,
                                official_runs=False))
  steps = SMOOTH_FREE_STEPS["cpu"] if net == "smooth" else 200
  c.solvers = _solvers(lr=0.01, free_steps=steps, phase_steps=25, lam=lam, rtol=1e-4,
                       spc=5, cg_steps=10, net=net, weak_lcp=weak)
  c.batch_size = 4
  c.num_epochs = 2
  # Polyak from the start of epoch 2 of 2, as the recipe averages the last ~85%.
  c.optimizer.update(dict(learning_rate=0.01, decay_every_epochs=1, polyak_start_epoch=1))
  c.log_every_steps = 10
  c.eval_every_epochs = 0
  c.checkpoint_every_steps = 50


def _test(c: ml_collections.ConfigDict, lam: float, net: str, weak: bool) -> None:
  """A tiny 5-way instance for the test-suite."""
  c.problem_options.update(dict(n_way=5, channels=8, blocks=2, image_size=14, n_query=2,
                                eval_n_query=2, eval_tasks=8, eval_batch_size=4,
                                steps_per_epoch=2, official_runs=False))
  c.solvers = _solvers(lr=0.05, free_steps=6, phase_steps=3, lam=lam, rtol=1e-4, spc=1,
                       cg_steps=3, net=net, weak_lcp=weak)
  c.batch_size = 4
  c.num_epochs = 1
  c.optimizer.update(dict(polyak_start_epoch=-1))
  c.log_every_steps = 1
  c.eval_every_epochs = 0
  c.checkpoint_every_steps = 0


def get_config(preset=None):
  size, net, weak = _parse(preset)
  c = base_config(batch_size=16, num_epochs=30, log_every_steps=25, eval_every_epochs=10,
                  checkpoint_every_steps=125)
  # Budget-limited relaxations by design (ReLU chatter / a fixed inner-loop budget):
  # non-convergence is expected, not a divergence.
  c.max_nonconverged_fraction = 1.0
  c.problem = "omniglot"
  lam = 0.5
  c.problem_options = ml_collections.ConfigDict(dict(
      n_way=20, k_shot=1, n_query=15, image_size=28, channels=64, blocks=4, lam=lam,
      learn_lambda=False, conv_impl="matmul", train_split="train", steps_per_epoch=125,
      eval_split="test", eval_tasks=600, eval_n_query=15, eval_batch_size=20,
      eval_seed=1234, official_runs=True, net=net,
      # The CML recipe's data (docs/omniglot_protocol.md): Table 3's CML and LCP numbers
      # were made with it; "vinyals" keeps rotated classes at meta-test too.
      protocol="cml"))
  c.solver = "lcp"
  free_steps = SMOOTH_FREE_STEPS["default"] if net == "smooth" else 200
  c.solvers = _solvers(lr=0.01, free_steps=free_steps, phase_steps=100, lam=lam, rtol=1e-4,
                       spc=5, cg_steps=20, net=net, weak_lcp=weak)
  c.optimizer = optimizer_config(learning_rate=0.01, schedule="step", decay_every_epochs=5,
                                 polyak_start_epoch=4)
  if size != "default":
    {"quick": _quick, "cpu": _cpu, "test": _test}[size](c, lam, net, weak)
  return c
