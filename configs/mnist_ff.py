"""MNIST, feedforward equilibrium network (2 x 256 tanh, block-structured eq. 11).

    python launch/run.py --config mnist_ff --config.solver=lcp_kp
    python launch/run.py --config mnist_ff:quick --config.solver=lcp_lf

Presets:
  (none)  the paper authors' public commands (Table 1) with normalised inputs:
          batch 64, 30 epochs, Adam 1e-3 with cosine decay to 0.1x; LCP alpha =
          0.1, dt = 1, k_i = 1, k_p = 0, tolerance 1e-6, <= 800 iterations; RBP
          1e-4 / 200; LF: Q decay 0.01, noise 0.01, tau_Q 1e5, timescale factor
          5; KP decay 1e-6; EBD: Adam on the states, lr 0.01 (FF) / 1e-3 (RNN,
          200 steps).
  paper_normalized  the same as (none), by name (Table 1 so far was run with it).
  paper   the authors' problem (see "paper and authors" below), solved by our
          fastest route to the same steady states.
  authors ``paper`` with the authors' integration as well, for an
          iteration-for-iteration comparison with their code.
  fast    same training, faster relaxations with the same fixed points
          (DI/KP/EBD: deadbeat controller gain k_i = 1 / alpha; EBD: Anderson
          instead of Adam; LF: 400 instead of 800 noisy steps for the Q rule);
          see benchmarks/results/speed_mnist.md.
  quick   ``fast`` for 1 epoch (a few minutes on 2 CPU cores, > 90% test accuracy).

Loss scale: problem_options.batch_mean_loss = True makes the per-example loss
CE / batch_size, the authors' convention, so alpha, k_i and beta = 1/alpha mean
what they mean in their code; all our gradients are then theirs / batch_size
(Adam does not care; their clip norm 10 becomes 10 / batch_size).

``mnist_rnn`` reuses :func:`build` with ``shape='rnn'``.

paper and authors -- the authors' settings (least-control repo, HEAD):
  * inputs raw [0, 1] (utils/data_utils.py:5-6, ``ToTensor()`` only);
  * net, loss CE mean over the batch (run_classification.py:116), alpha, gains,
    Adam 1e-3 + cosine to 0.1x per step (run_classification.py:124-130, gamma
    0.1), batch 64, 30 epochs: README commands, as in (none);
  * RNN clipping: two clips at 10, ``clip_grad_norm_`` on the model's params and
    separately on the auxiliary module's (KP feedback weights)
    (run_classification.py:22-24) -> ``clip_groups = 'separate'``; for RBP, DI,
    EBD and LF the auxiliary module has no gradients, so only KP differs;
  * steady state: relative change ``||x' - x|| / (1e-5 + ||x||) < 1e-6 dt``
    on the joint state, max over the batch, <= 800 Euler steps of dt 1
    (fixpoint_solver.py:8, 41, 81-89); the free phase of an LCP run (used at
    evaluation) has the same 1e-6 / 800; EBD runs pass no threshold (default
    1e-4, run_classification.py:59) and 800 (FF) / 200 (RNN) steps;
  * DI / KP / LF start the controlled phase from zeros
    (fixpoint_trainer.py:91-97); EBD from zeros (FF, ``ff_init=False``) or the
    free equilibrium (RNN), then exactly ``solver_max_iter`` Adam steps, no
    stopping rule (fixpoint_trainer.py:268-290);
  * KP feedback: every feedback matrix divided by its Frobenius norm
    (implicit_model.py:88-89, 100; the readout's ``randn / sqrt(10 * 256)``,
    fixpoint_trainer.py:139, has unit norm in expectation).
``paper`` differs from the authors only in how each steady state is reached,
choosing by measured wall time per step on 2 CPU cores (batch 64, DI-trained
weights, raw inputs; numbers in benchmarks/results/speed_mnist.md):
  * the controlled phase starts at the free equilibrium (fewer steps than
    from zeros: FF DI 84 vs 87 max, median example 46 vs 68);
  * DI / KP: Euler dt 1 (their integrator). Anderson and the Newton-Krylov
    route (``controlled_solve='newton'``, bilevel/controlled_solve.py) need
    fewer evaluations per example (FF DI median 12 vs 46, max 46 vs 84) but a
    vmapped Krylov step costs ~10 Euler steps on CPU, and Anderson / Newton
    without the relaxation's fallback leave the relaxation's basin on the RNN's
    near-critical examples (gradient error 0.6);
  * EBD: the same steady state (the minimiser of 1/2||f||^2 + L/alpha,
    section 2.4) reached with the DI dynamics (``dynamics='dynamic_inversion'``)
    to DI's tolerance 1e-6, psi* read as -f(phi*) as in EBD; their 800 / 200
    Adam steps leave ~10% of the FF examples unconverged.
  * every relaxation (free, controlled, adjoint) shrinks the vmapped batch to
    the examples still running, in up to 5 halvings (``compaction``,
    bilevel/fixed_point.py ``solve_compacted``): each example takes exactly the
    steps it takes in a plain vmap, but the few slow examples of a batch no
    longer make every step cost the whole batch (mnist_rnn:paper, 100 DI-trained
    steps: LCP-DI 182 -> 73 ms, RBP 27 -> 14 ms per call, updates unchanged;
    ``python -m benchmarks.stragglers_mnist``, docs/design.md).
``authors`` uses their integration. Remaining differences, both presets:
  * stopping is per example (an example stops when its own residual
    ``||F(z)|| <= 1e-6 ||z||`` is met), theirs when the worst example of the
    batch meets it; converged examples differ by less than the tolerance;
  * the train step also computes the free equilibrium (loss / metrics), which
    their LCP training steps skip: costs time, not the gradient;
  * EBD integrates the output controller u with the states (eq. 15); their
    energy nudges with beta = 1/alpha directly. Same minimiser, different Adam
    path (``authors`` is not step-for-step for EBD);
  * KP weight decay is added to the gradient of all params before Adam; theirs
    shrinks every param except the encoder by 1e-6 per step, outside Adam
    (fixpoint_trainer.py:143-149): a 1e-6 effect either way;
  * gradients are theirs / batch_size (loss-scale convention above) and the
    clip norm is 10 / batch_size accordingly;
  * LF's controlled phase starts at the free equilibrium in both presets
    (solvers/lcp_lf.py has its own flow, without ``controlled_start``);
  * our init draws PyTorch's U(+-1/sqrt(fan_in)) from a JAX key, not their seed.
"""

import ml_collections

from configs.base import base_config, optimizer_config, relaxation

PRESETS = ("quick", "fast", "paper", "paper_normalized", "authors")


def build(shape: str, preset=None) -> ml_collections.ConfigDict:
  """The MNIST config for ``shape`` in ('ff', 'rnn') and a preset (see module doc)."""
  if preset not in (None, "") and preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
  rnn = shape == "rnn"
  batch_size = 64
  c = base_config(batch_size=batch_size, num_epochs=30, log_every_steps=100,
                  eval_every_epochs=5, checkpoint_every_steps=2000, keep_checkpoints=2)
  c.problem = f"mnist_{shape}"
  c.problem_options = ml_collections.ConfigDict(dict(
      width=256, activation="tanh", normalize=True, data="shipped", batch_mean_loss=True,
      eval_batch_size=1000, eval_train_examples=10000))
  c.solver = "rbp" if rnn else "bp"

  free = relaxation(1e-4, 200)
  lcp = dict(alpha=0.1, k_i=1.0, k_p=0.0, free=free, controlled=relaxation(1e-6, 800))
  s = ml_collections.ConfigDict()
  # bp: backprop through the unrolled free relaxation; 3 Euler steps of size 1 are
  # the exact forward pass of the feedforward net.
  s.bp = dict(num_steps=30 if rnn else 3, free=free)
  s.rbp = dict(adjoint_method="fixed_point", free=free, adjoint=relaxation(1e-4, 200))
  s.lcp_di = dict(lcp)
  s.lcp_kp = dict(lcp, weight_decay=1e-6, feedback_init="random", init_scale=0.1)
  # EBD (eq. 15): gradient flow on 1/2 ||f||^2 with the output controller of eq. 6,
  # integrated by Adam on the states. (The authors' code nudges with beta = 1/alpha
  # directly; the steady state -- the minimiser of 1/2 ||f||^2 + L / alpha -- is the same.)
  s.lcp_ebd = dict(lcp, controlled=relaxation(
      1e-6, 200 if rnn else 800, "adam", learning_rate=1e-3 if rnn else 1e-2))
  s.lcp_lf = dict(lcp, modulated=True, q_init_scale=1.0, learn_q=True, sigma=0.01,
                  tau_q=1e5, q_weight_decay=0.01, timescale_factor=5.0, tau_eps=1.0,
                  noise_dt=1.0, noise_steps=800, noise_seed=0, presynaptic="deviation",
                  q_scale=1e-3)
  c.solvers = s

  c.optimizer = optimizer_config(schedule="cosine", final_lr_fraction=0.1, decay_factor=0.1,
                                 clip_norm=(10.0 / batch_size) if rnn else 0.0)

  if preset in ("fast", "quick"):
    for name in ("lcp_di", "lcp_kp", "lcp_ebd"):
      # u' = k_i (-grad L - alpha u) with k_i alpha dt = 1 reaches u = -grad L / alpha
      # in one step: same steady state, no slow integrator mode.
      s[name].k_i = 1.0 / s[name].alpha
    s.lcp_ebd.controlled = relaxation(1e-6, 800, "anderson", dt=0.5, memory=10,
                                      mixing=1.0, ridge=1e-6)
    s.lcp_lf.noise_steps = 400
  if preset == "quick":
    c.num_epochs = 1
    c.eval_every_epochs = 0
    c.problem_options.eval_train_examples = 2000
  if preset in ("paper", "authors"):
    _authors_problem(c, rnn)
  if preset == "paper":
    _fastest_route(c.solvers)
  if preset == "authors":
    _authors_integration(c.solvers, rnn)
  return c


def _authors_problem(c: ml_collections.ConfigDict, rnn: bool) -> None:
  """Raw inputs, the authors' clips and steady-state tolerances (module doc)."""
  c.problem_options.normalize = False
  if rnn:
    c.optimizer.clip_groups = "separate"
  for name in ("lcp_di", "lcp_kp", "lcp_lf"):
    c.solvers[name].free = relaxation(1e-6, 800)
  c.solvers.lcp_ebd.free = relaxation(1e-4, 200 if rnn else 800)


# Halvings of the batch as its examples stop (fixed_point.solve_compacted): 64 -> 2.
COMPACTION = 5


def _fastest_route(s: ml_collections.ConfigDict) -> None:
  """EBD reaches its steady state (the DI one, section 2.4) with the DI
  dynamics, Euler dt 1 to 1e-6 like DI; DI / KP keep Euler dt 1 from the free
  equilibrium (measured fastest, see the module doc). Every relaxation of every
  solver shrinks its batch to the examples still running (same per-example
  result; module doc)."""
  s.lcp_ebd.dynamics = "dynamic_inversion"
  s.lcp_ebd.controlled = relaxation(1e-6, 800)
  for solver in s.values():
    for phase in ("free", "controlled", "adjoint"):
      if phase in solver:
        solver[phase] = dict(solver[phase], compaction=COMPACTION)


def _authors_integration(s: ml_collections.ConfigDict, rnn: bool) -> None:
  """Euler dt 1 from zeros; EBD exactly 800 (FF, from zeros) / 200 (RNN, from the
  free equilibrium) Adam steps (rtol 0: no early stop); unit-norm KP feedback."""
  for name in ("lcp_di", "lcp_kp"):
    s[name].controlled_start = "zeros"
  s.lcp_ebd.controlled_start = "free" if rnn else "zeros"
  s.lcp_ebd.controlled = dict(s.lcp_ebd.controlled, rtol=0.0)
  s.lcp_kp.feedback_init = "unit_norm"


def get_config(preset=None):
  return build("ff", preset)
