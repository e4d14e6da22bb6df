"""The standard 4-block few-shot conv net, in haiku, with per-task batch norm.

Block ``b`` (``b = 1..blocks``): 3x3 convolution (``channels`` filters, SAME
padding, no bias -- batch norm removes it), batch norm on the statistics of
the batch it is given (no running averages: every task normalises with its
own support or query statistics, as in MAML / iMAML / CML), learnable scale
and offset, then the nonlinearity and 2x2 pooling with stride 2 (floor: 28 ->
14 -> 7 -> 3 -> 1) chosen by ``net`` (:data:`NETS`):

* ``"maxpool"`` (default, the paper's / CML recipe's net): ReLU and max-pool;
* ``"smooth"``: softplus and average pool, and batch norm with
  ``eps = SMOOTH_BN_EPS`` (0.1). The inner energy E(phi) of eq. 16 is then
  C-infinity in phi with bounded curvature, so ``grad E = 0`` has solutions that
  heavy-ball SGD reaches linearly; with ReLU + max-pool ``grad E`` jumps at the
  kinks and the inner loop stalls at a gradient-norm floor. The larger eps is
  needed because batch norm's ``rsqrt(var + eps)`` has curvature ~ 1/(var + eps):
  on a 1-shot support set the inner loop drives some channels' variance to
  ~0.02, the Hessian's top eigenvalue then grows past heavy-ball's stability
  limit and the loop diverges (measurements in docs/omniglot.md). Same parameter
  tree and spatial pyramid as ``"maxpool"``: only these maps change.
A linear ``n_way`` head reads the flattened features. Initialisation: He
(Kaiming) normal convolutions, unit scale / zero offset, and the head uniform
in ``+-1/sqrt(fan_in)`` (PyTorch's ``nn.Linear``; the CML authors' recipe).

``conv_impl`` chooses how a convolution is computed; both give the same
numbers (tests check it):

* ``"matmul"`` (default): im2col -- nine shifted copies of the padded input
  concatenated on the channel axis, then one ``[N*H*W, 9*C_in] x [9*C_in, C]``
  matrix product. On CPU this is what keeps the inner loop fast: XLA:CPU runs a
  ``lax.conv`` inside a ``while``/``scan`` body roughly 10-20x slower than in
  straight-line code, while dense matrix products carry no such penalty; and
  under ``vmap`` over tasks with per-task weights a ``lax.conv`` becomes a
  grouped convolution whereas a product becomes a batched product (see
  benchmarks/results/speed_omniglot.md).
* ``"lax"``: ``jax.lax.conv_general_dilated`` (cuDNN on GPU).

All functions take ONE batch of images ``[N, H, W, C_in]`` (one task's support
or query set); the solvers vmap over tasks.
"""

from __future__ import annotations

import math
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

PyTree = Any
CONV_IMPLS = ("matmul", "lax")
NETS = ("maxpool", "smooth")
SMOOTH_BN_EPS = 0.1  # bounds batch norm's curvature on tiny support sets (module doc)


def conv3x3(x: jax.Array, w: jax.Array, impl: str = "matmul") -> jax.Array:
  """SAME 3x3 convolution, stride 1: ``x [N, H, W, Ci]``, ``w [3, 3, Ci, Co]`` -> ``[N, H, W, Co]``."""
  if impl == "lax":
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if impl != "matmul":
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
  n, h, wd, ci = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Patch layout (dy, dx, ci) matches w.reshape(9 * ci, co) (HWIO order).
  patches = jnp.concatenate(
      [xp[:, dy:dy + h, dx:dx + wd, :] for dy in range(3) for dx in range(3)], axis=-1)
  out = patches.reshape(n * h * wd, 9 * ci) @ w.reshape(9 * ci, -1)
  return out.reshape(n, h, wd, -1)


def max_pool2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, VALID (odd sizes are floored): ``[N, H, W, C] -> [N, H//2, W//2, C]``."""
  n, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  x = x[:, :2 * h2, :2 * w2, :]
  return x.reshape(n, h2, 2, w2, 2, c).max(axis=(2, 4))


def avg_pool2x2(x: jax.Array) -> jax.Array:
  """2x2 average pool, stride 2, VALID (floored like :func:`max_pool2x2`); linear, so smooth."""
  n, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  x = x[:, :2 * h2, :2 * w2, :]
  return x.reshape(n, h2, 2, w2, 2, c).mean(axis=(2, 4))


def batch_norm(x: jax.Array, scale: jax.Array, offset: jax.Array,
               eps: float = 1e-5) -> jax.Array:
  """Normalises each channel with the mean / variance of THIS batch (per task)."""
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + offset


class ConvBlock(hk.Module):
  """conv3x3 -> per-task batch norm -> ReLU -> 2x2 max-pool (``net="maxpool"``),
  or softplus -> 2x2 average pool (``net="smooth"``)."""

  def __init__(self, channels: int, impl: str, name: str | None = None,
               net: str = "maxpool"):
    super().__init__(name=name)
    self.channels = channels
    self.impl = impl
    self.net = net

  def __call__(self, x: jax.Array) -> jax.Array:
    ci = x.shape[-1]
    w = hk.get_parameter("w", (3, 3, ci, self.channels), x.dtype,
                         init=hk.initializers.VarianceScaling(2.0, "fan_in", "normal"))
    scale = hk.get_parameter("scale", (self.channels,), x.dtype, init=jnp.ones)
    offset = hk.get_parameter("offset", (self.channels,), x.dtype, init=jnp.zeros)
    if self.net == "smooth":
      y = batch_norm(conv3x3(x, w, self.impl), scale, offset, eps=SMOOTH_BN_EPS)
      return avg_pool2x2(jax.nn.softplus(y))
    y = batch_norm(conv3x3(x, w, self.impl), scale, offset)
    return max_pool2x2(jax.nn.relu(y))


def _forward(images: jax.Array, *, n_way: int, channels: int, blocks: int,
             impl: str, net: str = "maxpool") -> jax.Array:
  x = images
  for b in range(blocks):
    x = ConvBlock(channels, impl, name=f"block{b + 1}", net=net)(x)
  x = x.reshape(x.shape[0], -1)
  bound = 1.0 / math.sqrt(x.shape[-1])
  init = hk.initializers.RandomUniform(-bound, bound)
  return hk.Linear(n_way, w_init=init, b_init=init, name="head")(x)


def make_convnet(n_way: int, channels: int = 64, blocks: int = 4,
                 conv_impl: str = "matmul", net: str = "maxpool") -> hk.Transformed:
  """``hk.Transformed`` (no rng at apply): ``init(key, images)``, ``apply(params, images) -> logits [N, n_way]``."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
  if net not in NETS:
    raise ValueError(f"net must be one of {NETS} (problem_options.net), got {net!r}")
  if min(n_way, channels, blocks) < 1:
    raise ValueError(f"n_way, channels and blocks must be positive, got {n_way}, "
                     f"{channels}, {blocks}")
  return hk.without_apply_rng(hk.transform(
      lambda images: _forward(images, n_way=n_way, channels=channels, blocks=blocks,
                              impl=conv_impl, net=net)))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy; ``logits [N, K]``, int ``labels [N]``."""
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))
