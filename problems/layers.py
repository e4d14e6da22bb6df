"""Layers for problems written as plain functions of ONE example (no haiku).

Convolutions use :func:`conv2d`, whose input VJP is written with a standard
``HWIO`` kernel. On CPU (jax 0.10.2) XLA runs the convolutions that jax's own
transpose rule emits (kernel dimension numbers ``[0, 1, o, i]``) 5-80x slower
inside a ``while_loop`` body than in straight-line code, while forward
convolutions lose little; the input VJP is exactly what the adjoint (rbp) and
dynamic-inversion (lcp_di/kp) relaxations iterate. See
``benchmarks/results/speed_cifar.md``. ``impl="xla"`` keeps jax's rule (needed
for forward-over-reverse, e.g. ``jax.hessian``). Why the haiku conv net of
Omniglot (:mod:`problems.convnet`) has its own im2col workaround instead:
``docs/design.md`` ("Convolutions inside loops").
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any
DN = ("NHWC", "HWIO", "NHWC")

__all__ = ["DN", "ACTIVATIONS", "activation", "avg_pool", "conv2d", "conv_init", "dense_init",
           "float_dtype", "group_norm", "group_norm_init", "max_pool", "out_size"]


# ----------------------------------------------------------------- convolutions

def out_size(n: int, k: int, s: int, lo: int, hi: int) -> int:
  """Output length of a convolution of length ``n``, kernel ``k``, stride ``s``, pads lo/hi."""
  return (n + lo + hi - k) // s + 1


def _xla_conv(x, w, stride, padding):
  return lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _loop_friendly_conv(x, w, stride, padding):
  return _xla_conv(x, w, stride, padding)


def _lf_fwd(x, w, stride, padding):
  return _xla_conv(x, w, stride, padding), (x, w)


def _lf_bwd(stride, padding, res, g):
  x, w = res
  kh, kw = w.shape[:2]
  n_h, n_w = x.shape[1:3]
  # Input cotangent: a stride-1 convolution of the (stride-)dilated cotangent
  # with the flipped kernel, its in/out axes swapped so it is HWIO again.
  w_t = jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2))
  pads = []
  for n, k, s, (lo, hi) in ((n_h, kh, stride[0], padding[0]), (n_w, kw, stride[1], padding[1])):
    pads.append((k - 1 - lo, k - 1 - hi + (n + lo + hi - k) % s))
  dx = lax.conv_general_dilated(g, w_t, (1, 1), pads, lhs_dilation=stride,
                                dimension_numbers=DN)
  # Kernel cotangent: dw[a,b,i,o] = sum_{n,p,q} xpad[n, s p + a, s q + b, i] g[n,p,q,o],
  # a convolution of xpad (batch <-> feature swapped) with g as kernel, dilated by s.
  xpad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  dw = lax.conv_general_dilated(jnp.transpose(xpad, (3, 1, 2, 0)),
                                jnp.transpose(g, (1, 2, 0, 3)), (1, 1), "VALID",
                                rhs_dilation=stride, dimension_numbers=DN)
  dw = jnp.transpose(dw[:, :kh, :kw, :], (1, 2, 0, 3))
  return dx, dw


_loop_friendly_conv.defvjp(_lf_fwd, _lf_bwd)


def _pads(kh: int, kw: int, stride: int, padding: int | str) -> tuple:
  """Explicit ((lo, hi), (lo, hi)) padding for ``conv2d``'s ``padding`` argument."""
  if isinstance(padding, str):
    if padding == "SAME":
      if stride != 1:
        raise ValueError("padding='SAME' is only supported with stride 1 here")
      return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in (kh, kw))
    if padding == "VALID":
      return ((0, 0), (0, 0))
    raise ValueError(f"padding must be an int, 'SAME' or 'VALID', got {padding!r}")
  return ((int(padding), int(padding)), (int(padding), int(padding)))


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1,
           padding: int | str = "SAME", impl: str = "loop") -> jax.Array:
  """2-D convolution of one image ``x [H, W, Ci]`` with ``w [kh, kw, Ci, Co]``.

  ``padding``: an int (symmetric) or ``"SAME"``/``"VALID"``. ``impl="loop"``
  (default) uses a custom VJP made of HWIO convolutions (fast inside
  while-loops on CPU); ``impl="xla"`` uses jax's transpose rule (supports
  forward-mode autodiff through the VJP, e.g. Hessians). Returns ``[H', W', Co]``.
  """
  kh, kw = w.shape[:2]
  pads = _pads(kh, kw, stride, padding)
  if min(lo for lo, _ in pads) > min(kh, kw) - 1:
    raise ValueError(f"padding {pads} larger than kernel size - 1 is not supported")
  strides = (int(stride), int(stride))
  if impl == "loop":
    # Input cotangents from the custom rule, kernel cotangents from jax's rule:
    # the kernel cotangent is only needed outside loops (the one VJP of the
    # update), where jax's rule on the whole batch beats a per-example custom
    # rule under vmap. Both terms are the same convolution (XLA computes it
    # once), and a + b - b == a exactly when a == b.
    xb, sg = x[None], lax.stop_gradient
    native = _xla_conv(sg(xb), w, strides, pads)
    out = _loop_friendly_conv(xb, sg(w), strides, pads) + native - sg(native)
  elif impl == "xla":
    out = _xla_conv(x[None], w, strides, pads)
  else:
    raise ValueError(f"conv impl must be 'loop' or 'xla', got {impl!r}")
  return out[0]


# ----------------------------------------------------------------- norms and pooling

def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
               eps: float = 1e-5) -> jax.Array:
  """GroupNorm of one feature map ``x [H, W, C]`` (per-example statistics)."""
  h, w, c = x.shape
  xg = x.reshape(h, w, groups, c // groups)
  mean = jnp.mean(xg, axis=(0, 1, 3), keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=(0, 1, 3), keepdims=True)
  xg = (xg - mean) * lax.rsqrt(var + eps)
  return xg.reshape(h, w, c) * scale + bias


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """VALID max pooling of ``x [H, W, C]``."""
  return lax.reduce_window(x, -jnp.inf, lax.max, (window, window, 1), (stride, stride, 1),
                           "VALID")


def avg_pool(x: jax.Array, size: int) -> jax.Array:
  """Non-overlapping ``size x size`` average pooling of ``x [H, W, C]`` (H, W divisible)."""
  h, w, c = x.shape
  return x.reshape(h // size, size, w // size, size, c).mean(axis=(1, 3))


# ----------------------------------------------------------------- initialisers

def float_dtype(ex: PyTree, key: str = "x"):
  """Parameters take the example's float dtype (float32 unless x64 data)."""
  if ex is None:
    return jnp.float32
  dtype = jnp.asarray(ex[key]).dtype
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def _uniform(key, shape, fan_in, dtype=jnp.float32):
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def dense_init(key: jax.Array, n_in: int, n_out: int, dtype=jnp.float32) -> dict:
  """``{"w" [n_in, n_out], "b" [n_out]}``, uniform in ``+-1/sqrt(n_in)`` (PyTorch's)."""
  k1, k2 = jax.random.split(key)
  return {"w": _uniform(k1, (n_in, n_out), n_in, dtype),
          "b": _uniform(k2, (n_out,), n_in, dtype)}


def conv_init(key: jax.Array, k: int, c_in: int, c_out: int, bias: bool = True,
              std: float | None = None, dtype=jnp.float32) -> dict:
  """HWIO kernel (uniform in ``+-1/sqrt(fan_in)``, or ``N(0, std^2)``) and bias."""
  k1, k2 = jax.random.split(key)
  fan_in = k * k * c_in
  w = (std * jax.random.normal(k1, (k, k, c_in, c_out), dtype) if std is not None
       else _uniform(k1, (k, k, c_in, c_out), fan_in, dtype))
  return {"w": w, "b": _uniform(k2, (c_out,), fan_in, dtype)} if bias else {"w": w}


def group_norm_init(c: int, dtype=jnp.float32) -> dict:
  return {"scale": jnp.ones((c,), dtype), "bias": jnp.zeros((c,), dtype)}


# ----------------------------------------------------------------- activations

ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu, "tanh": jnp.tanh, "softplus": jax.nn.softplus,
    "gelu": jax.nn.gelu, "identity": lambda v: v,
}


def activation(name: str) -> Callable:
  """The activation called ``name`` (a key of :data:`ACTIVATIONS`)."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]
