"""CIFAR-10 models as equilibrium problems (Table 2): a convolutional feedforward net
and a deep equilibrium model (DEQ), both stated for ONE example.

* :func:`ff_problem` -- eq. 11 with block-structured, convolutional ``W`` and
  ``U``: the state is a tuple of per-layer activations ``(h_0, ..., h_L,
  logits)`` and

      f_0 = -h_0 + pool(conv_enc(x) + b)            (the input term U x)
      f_l = -h_l + conv_l(relu(h_{l-1})) + b_l       (conv blocks of W)
      f_j = -h_j + W_j relu(h_{j-1}) + b_j           (dense blocks of W)
      f_o = -logits + W_o relu(h_L) + b_o            (read-out, a block of W)

  The read-out is part of the dynamics (the output units ``y`` of eq. 1 are the
  ``logits`` component), so every weight is in ``theta`` and LCP's update
  (eq. 12) covers the classifier too. Euler steps with ``dt = 1`` reach the
  free equilibrium in exactly ``depth`` steps (the forward pass).
* :func:`deq_problem` -- a residual block of convolutions with group norm,
  repeated to equilibrium (Bai et al.'s DEQ), with a conv encoder and a pooled
  linear decoder, again with the decoder as a logits component of the state:

      x_e = GN(conv_e(x) + b_e)                       (encoder, inside f)
      block(z) = GN_3(relu(z + GN_2(x_e + conv_2(GN_1(relu(conv_1(z)))))))
      f_z = block(z) - z,    f_o = -logits + W_o flatten(avgpool(z)) + b_o

  BatchNorm of the reference implementation is replaced by per-example
  GroupNorm: problems here are stated for one example.

Convolutions are :func:`problems.layers.conv2d` (a loop-friendly custom VJP;
``conv_impl="xla"`` keeps jax's rule, e.g. for Hessians). The builders that
load CIFAR-10 for these models are in :mod:`problems.cifar`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bilevel.problem import BilevelProblem, ProblemError
from problems import layers
from problems.layers import (avg_pool, conv2d, conv_init, dense_init, float_dtype,
                             group_norm, group_norm_init, max_pool, out_size)
from problems.losses import classification_loss, classification_metrics

PyTree = Any

__all__ = ["ff_problem", "deq_problem"]


# ----------------------------------------------------------------- the FF conv net

def _conv_state_shapes(image_hw: tuple[int, int], channels: tuple[int, ...], enc_kernel: int,
                       kernel: int, stride: int, padding: int, pool_window: int,
                       pool_stride: int) -> list[tuple[int, int, int]]:
  """``[H_l, W_l, C_l]`` of the FF net's conv states (encoder, then each strided conv)."""
  height, width = image_hw
  enc_pad = (enc_kernel - 1) // 2
  h = out_size(height, enc_kernel, 1, enc_pad, enc_pad)
  w = out_size(width, enc_kernel, 1, enc_pad, enc_pad)
  if pool_window:
    h, w = ((h - pool_window) // pool_stride + 1, (w - pool_window) // pool_stride + 1)
  shapes = [(h, w, channels[0])]
  for c in channels[1:]:
    h = out_size(h, kernel, stride, padding, padding)
    w = out_size(w, kernel, stride, padding, padding)
    shapes.append((h, w, c))
  if min(min(s[0], s[1]) for s in shapes) < 1:
    raise ProblemError(
        f"ff_problem: an image of {height}x{width} is too small for these layers "
        f"(spatial sizes {[s[:2] for s in shapes]}); use fewer conv layers, a smaller "
        "kernel/stride or no pooling")
  return shapes


def ff_problem(image_shape: Sequence[int] = (32, 32, 3),
               channels: Sequence[int] = (96, 128, 256),
               hidden: Sequence[int] = (2048, 2048),
               num_classes: int = 10, *,
               enc_kernel: int = 5, kernel: int = 5, stride: int = 2, padding: int = 1,
               pool_window: int = 3, pool_stride: int = 2,
               activation: str = "relu", conv_impl: str = "loop",
               example: PyTree = None) -> BilevelProblem:
  """The convolutional feedforward net of Table 2 as an equilibrium (eq. 11).

  Defaults give the paper's network: conv 5x5 3->96 (+ maxpool 3/2) -> 15x15,
  conv 5x5/2 96->128 -> 7x7, conv 5x5/2 128->256 -> 3x3, dense 2304->2048,
  2048->2048, read-out 2048->10; ReLU. ``channels[0]`` is the encoder's width,
  each further entry one strided conv layer; ``hidden`` the dense layers.
  State: tuple of per-layer activations ``[H_l, W_l, C_l]`` / ``[n_j]``, then
  ``logits [num_classes]``. Examples: ``{"x": [H, W, C] float, "label": int}``.
  """
  act = layers.activation(activation)
  height, width, c_in = (int(v) for v in image_shape)
  channels, hidden = tuple(int(c) for c in channels), tuple(int(h) for h in hidden)
  if not channels:
    raise ProblemError("ff_problem: channels needs at least the encoder width")
  enc_pad = (enc_kernel - 1) // 2
  shapes = _conv_state_shapes((height, width), channels, enc_kernel, kernel, stride, padding,
                              pool_window, pool_stride)
  dense_sizes = (int(np.prod(shapes[-1])),) + hidden + (num_classes,)
  state_shapes = tuple(shapes) + tuple((n,) for n in hidden) + ((num_classes,),)

  def init_params(key, ex=None):
    dt = float_dtype(ex)
    keys = jax.random.split(key, 1 + len(channels) + len(dense_sizes))
    params = {"enc": conv_init(keys[0], enc_kernel, c_in, channels[0], dtype=dt)}
    params["conv"] = [conv_init(keys[1 + i], kernel, ci, co, dtype=dt)
                      for i, (ci, co) in enumerate(zip(channels[:-1], channels[1:]))]
    params["dense"] = [dense_init(keys[1 + len(channels) + j], ni, no, dt)
                       for j, (ni, no) in enumerate(zip(dense_sizes[:-1], dense_sizes[1:]))]
    return params

  def encode(params, x):
    e = conv2d(x, params["enc"]["w"], 1, enc_pad, conv_impl) + params["enc"]["b"]
    return max_pool(e, pool_window, pool_stride) if pool_window else e

  def dynamics(params, state, ex):
    drives = [encode(params, ex["x"])]
    for l, layer in enumerate(params["conv"]):
      drives.append(conv2d(act(state[l]), layer["w"], stride, padding, conv_impl) + layer["b"])
    prev = act(state[len(channels) - 1]).reshape(-1)
    for j, layer in enumerate(params["dense"]):
      drives.append(prev @ layer["w"] + layer["b"])
      if j + 1 < len(params["dense"]):
        prev = act(state[len(channels) + j])
    return tuple(d - s for d, s in zip(drives, state))

  def init_state(params, ex):
    return tuple(jnp.zeros(s, jnp.asarray(ex["x"]).dtype) for s in state_shapes)

  return BilevelProblem(
      dynamics=dynamics, loss=classification_loss, output=lambda s: s[-1],
      init_state=init_state, init_params=init_params, metrics=classification_metrics,
      name="cifar10_ff", example=example)


# ----------------------------------------------------------------- the DEQ

def deq_problem(image_shape: Sequence[int] = (32, 32, 3), channels: int = 48,
                inner_channels: int = 64, num_classes: int = 10, *,
                kernel: int = 3, groups: int = 8, pool: int = 8, block_init_std: float = 0.01,
                activation: str = "relu", conv_impl: str = "loop",
                example: PyTree = None) -> BilevelProblem:
  """A DEQ: residual conv block with group norm repeated to equilibrium.

  State: ``(z [H, W, channels], logits [num_classes])``; see the module
  docstring for f. ``pool`` is the side of the decoder's average pooling
  (32 / 8 -> a 4x4 grid, as in the reference DEQ). The block's convolutions
  start at ``N(0, block_init_std^2)``, so the block starts contractive.
  ``activation`` replaces both ReLUs (a smooth one for Hessian-based tests).
  """
  act = layers.activation(activation)
  height, width, c_in = (int(v) for v in image_shape)
  if channels % groups or inner_channels % groups:
    raise ProblemError(f"deq_problem: channels ({channels}) and inner_channels "
                       f"({inner_channels}) must be divisible by groups ({groups})")
  if height % pool or width % pool:
    raise ProblemError(f"deq_problem: image {height}x{width} not divisible by pool {pool}")
  n_read = (height // pool) * (width // pool) * channels

  def init_params(key, ex=None):
    dt = float_dtype(ex)
    k = jax.random.split(key, 4)
    return {
        "enc": {**conv_init(k[0], kernel, c_in, channels, dtype=dt),
                "gn": group_norm_init(channels, dt)},
        "block": {"conv1": conv_init(k[1], kernel, channels, inner_channels, bias=False,
                                      std=block_init_std, dtype=dt),
                  "conv2": conv_init(k[2], kernel, inner_channels, channels, bias=False,
                                      std=block_init_std, dtype=dt),
                  "gn1": group_norm_init(inner_channels, dt),
                  "gn2": group_norm_init(channels, dt),
                  "gn3": group_norm_init(channels, dt)},
        "out": dense_init(k[3], n_read, num_classes, dt),
    }

  def gn(x, p):
    return group_norm(x, p["scale"], p["bias"], groups)

  def dynamics(params, state, ex):
    z, logits = state
    enc, blk = params["enc"], params["block"]
    x_e = gn(conv2d(ex["x"], enc["w"], 1, "SAME", conv_impl) + enc["b"], enc["gn"])
    y = gn(act(conv2d(z, blk["conv1"]["w"], 1, "SAME", conv_impl)), blk["gn1"])
    z_new = gn(act(z + gn(x_e + conv2d(y, blk["conv2"]["w"], 1, "SAME", conv_impl),
                                  blk["gn2"])), blk["gn3"])
    read = avg_pool(z, pool).reshape(-1) @ params["out"]["w"] + params["out"]["b"]
    return (z_new - z, read - logits)

  def init_state(params, ex):
    dtype = jnp.asarray(ex["x"]).dtype
    return (jnp.zeros((height, width, channels), dtype), jnp.zeros((num_classes,), dtype))

  return BilevelProblem(
      dynamics=dynamics, loss=classification_loss, output=lambda s: s[-1],
      init_state=init_state, init_params=init_params, metrics=classification_metrics,
      name="cifar10_deq", example=example)
