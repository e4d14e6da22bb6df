"""MNIST, feedforward equilibrium network (2 x 256 tanh, block-structured eq. 11).

    python launch/run.py --config mnist_ff --config.solver=lcp_kp
    python launch/run.py --config mnist_ff:quick --config.solver=lcp_lf

Presets:
  (none)  the paper authors' public commands (Table 1): batch 64, 30 epochs,
          Adam 1e-3 with cosine decay to 0.1x; LCP alpha = 0.1, dt = 1, k_i = 1,
          k_p = 0, tolerance 1e-6, <= 800 iterations; RBP 1e-4 / 200; LF: Q decay
          0.01, noise 0.01, tau_Q 1e5, timescale factor 5; KP decay 1e-6; EBD:
          Adam on the states, lr 0.01 (FF) / 1e-3 (RNN, 200 steps).
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
"""

import ml_collections

from configs.base import base_config, optimizer_config, relaxation

PRESETS = ("quick", "fast", "paper")


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
  return c


def get_config(preset=None):
  return build("ff", preset)
