"""MNIST, equilibrium RNN (one fully connected recurrent layer of 256 tanh units).

    python launch/run.py --config mnist_rnn --config.solver=lcp_di
    python launch/run.py --config mnist_rnn:quick --config.solver=rbp

Same presets and conventions as ``configs/mnist_ff.py`` (whose ``build`` this
reuses); RNN-specific defaults from the authors' commands: gradient-norm clip
10 (10 / batch_size on our gradient scale), baseline RBP, EBD Adam lr 1e-3 for
200 steps started at the free equilibrium. At ``paper`` / ``authors`` the
two clips of their code are two: params and the KP feedback weights clipped
separately (``optimizer.clip_groups = 'separate'``).
"""

from configs import mnist_ff


def get_config(preset=None):
  return mnist_ff.build("rnn", preset)
