"""The equilibrium implicit neural representation (Table 2, INR) for one pixel.

One example is one pixel: ``{"coords": [2] in [0, 1), "rgb": [c] in [0, 1]}``.
The coordinates are lifted by fixed random Fourier features (Tancik et al.
2020) ``gamma(p) = [sin(2 pi B p), cos(2 pi B p)]``, ``B ~ N(0, scale^2)``
(``[m, 2]``, drawn once from ``feature_seed``, not trained), and drive an
equilibrium RNN (eq. 11) whose read-out is a block of the state, so that every
weight is in ``theta`` and the output units are a state component:

    f_h   = -h   + W sigma(h) + U gamma(p) + b     (W spectrally normalised)
    f_rgb = -rgb + D sigma(h) + d

The loss is the pixel's mean squared error over channels. The image, the
train/test protocol and the PSNR are the builder's (:mod:`problems.inr`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bilevel.problem import BilevelProblem
from problems import layers

PyTree = Any

__all__ = ["fourier_matrix", "inr_problem"]


def fourier_matrix(num_features: int, scale: float, seed: int) -> np.ndarray:
  """The fixed ``B [num_features, 2] ~ N(0, scale^2)`` of the Fourier features."""
  return (scale * np.random.default_rng(seed).standard_normal((num_features, 2))
          ).astype(np.float32)


def _spectral_normaliser(hidden: int, bound: float,
                         iterations: int) -> Callable[[jax.Array], jax.Array]:
  """``W -> W min(1, bound / ||W||_2)`` (identity if ``bound`` is 0), ``||W||_2`` by
  ``iterations`` unrolled power-iteration steps from a fixed probe vector."""
  probe = jnp.asarray(np.random.default_rng(12345).standard_normal(hidden), jnp.float32)

  def recurrent(w):
    if not bound:
      return w
    v = probe / jnp.linalg.norm(probe)
    for _ in range(iterations):  # power iteration on W^T W (unrolled)
      v = w.T @ (w @ v)
      v = v / jnp.linalg.norm(v)
    sigma = jnp.linalg.norm(w @ v)
    return w * jnp.minimum(1.0, bound / sigma)

  return recurrent


def inr_problem(b_matrix: np.ndarray, hidden: int = 256, out_channels: int = 3, *,
                activation: str = "tanh", recurrent_scale: float = 0.5,
                spectral_bound: float = 0.9, power_iterations: int = 20,
                example: PyTree = None) -> BilevelProblem:
  """The equilibrium INR for one pixel; state ``(h [hidden], rgb [out_channels])``.

  ``b_matrix [m, 2]``: Fourier frequencies (a constant of the problem).
  ``recurrent_scale``: W starts as ``N(0, recurrent_scale^2 / hidden)`` (spectral
  radius about ``recurrent_scale``), so the free dynamics start contractive.
  ``spectral_bound`` (0 = off): the W used in f is ``W min(1, bound /
  ||W||_2)``, ``||W||_2`` estimated by ``power_iterations`` steps of power
  iteration (spectral normalisation). With a 1-Lipschitz activation (tanh,
  relu) and bound < 1 the free dynamics are a contraction: the equilibrium is
  unique and ``||phi_free - phi_controlled|| <= ||psi|| / (1 - bound)``, so
  driving the least control H down (LCP) also fits the free equilibrium
  (Proposition 5's conditioning). Without it, lcp_di on this problem reduced H
  while the free equilibrium drifted away (Euler/Anderson stopped converging).
  """
  act = layers.activation(activation)
  b_matrix = jnp.asarray(b_matrix)
  n_feat = 2 * b_matrix.shape[0]
  recurrent = _spectral_normaliser(hidden, spectral_bound, power_iterations)

  def features(p):
    proj = 2.0 * jnp.pi * (b_matrix @ p)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)])

  def init_params(key, ex=None):
    dt = layers.float_dtype(ex, "coords")
    k = jax.random.split(key, 5)
    unif = lambda kk, shape, fan: jax.random.uniform(kk, shape, dt, -1, 1) / math.sqrt(fan)
    return {"W": recurrent_scale * jax.random.normal(k[0], (hidden, hidden), dt)
                 / math.sqrt(hidden),
            "U": unif(k[1], (hidden, n_feat), n_feat), "b": unif(k[2], (hidden,), n_feat),
            "D": unif(k[3], (out_channels, hidden), hidden),
            "d": jnp.full((out_channels,), 0.5, dt)}

  def dynamics(params, state, ex):
    h, rgb = state
    a = act(h)
    f_h = -h + recurrent(params["W"]) @ a + params["U"] @ features(ex["coords"]) + params["b"]
    f_rgb = -rgb + params["D"] @ a + params["d"]
    return (f_h, f_rgb)

  def init_state(params, ex):
    dtype = jnp.asarray(ex["coords"]).dtype
    return (jnp.zeros((hidden,), dtype), jnp.zeros((out_channels,), dtype))

  def loss(rgb, ex):
    return jnp.mean(jnp.square(rgb - ex["rgb"]))

  return BilevelProblem(dynamics=dynamics, loss=loss, output=lambda s: s[1],
                        init_state=init_state, init_params=init_params,
                        metrics=lambda rgb, ex: {"mse": loss(rgb, ex)},
                        name="inr", example=example)
