"""CIFAR-10 as equilibrium problems (Table 2): a convolutional feedforward net
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

Convolutions use :func:`conv2d`, whose input VJP is written with a standard
``HWIO`` kernel. On CPU (jax 0.10.2) XLA runs the convolutions that jax's own
transpose rule emits (kernel dimension numbers ``[0, 1, o, i]``) 5-80x slower
inside a ``while_loop`` body than in straight-line code, while forward
convolutions lose little; the input VJP is exactly what the adjoint (rbp) and
dynamic-inversion (lcp_di/kp) relaxations iterate. See
``benchmarks/results/speed_cifar.md``. ``conv_impl="xla"`` keeps jax's rule
(needed for forward-over-reverse, e.g. ``jax.hessian``).

Data: :func:`problems.datasets.load_cifar10` (``data_dir`` or
``$BILEVEL_DATA_DIR``; lossless python batches, else the LOSSY JPEG copy,
which every result must name) or TFDS (``problem_options.source="tfds"``).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bilevel.problem import BilevelProblem, ProblemError
from problems.base import Task

PyTree = Any
DN = ("NHWC", "HWIO", "NHWC")

__all__ = ["conv2d", "group_norm", "ff_problem", "deq_problem", "build_ff", "build_deq",
           "make_evaluator", "cross_entropy", "classification_metrics"]


# ----------------------------------------------------------------- convolutions

def _out_size(n: int, k: int, s: int, lo: int, hi: int) -> int:
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


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1,
           padding: int | str = "SAME", impl: str = "loop") -> jax.Array:
  """2-D convolution of one image ``x [H, W, Ci]`` with ``w [kh, kw, Ci, Co]``.

  ``padding``: an int (symmetric) or ``"SAME"``/``"VALID"``. ``impl="loop"``
  (default) uses a custom VJP made of HWIO convolutions (fast inside
  while-loops on CPU); ``impl="xla"`` uses jax's transpose rule (supports
  forward-mode autodiff through the VJP, e.g. Hessians). Returns ``[H', W', Co]``.
  """
  kh, kw = w.shape[:2]
  if isinstance(padding, str):
    if padding == "SAME":
      pads = tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in (kh, kw))
      if stride != 1:
        raise ValueError("padding='SAME' is only supported with stride 1 here")
    elif padding == "VALID":
      pads = ((0, 0), (0, 0))
    else:
      raise ValueError(f"padding must be an int, 'SAME' or 'VALID', got {padding!r}")
  else:
    pads = ((int(padding), int(padding)), (int(padding), int(padding)))
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


def _float_dtype(ex, key="x"):
  """Parameters take the example's float dtype (float32 unless x64 data)."""
  if ex is None:
    return jnp.float32
  dtype = jnp.asarray(ex[key]).dtype
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def _uniform(key, shape, fan_in, dtype=jnp.float32):
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense_init(key, n_in, n_out, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  return {"w": _uniform(k1, (n_in, n_out), n_in, dtype),
          "b": _uniform(k2, (n_out,), n_in, dtype)}


def _conv_init(key, k, c_in, c_out, bias=True, std=None, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  fan_in = k * k * c_in
  w = (std * jax.random.normal(k1, (k, k, c_in, c_out), dtype) if std is not None
       else _uniform(k1, (k, k, c_in, c_out), fan_in, dtype))
  return {"w": w, "b": _uniform(k2, (c_out,), fan_in, dtype)} if bias else {"w": w}


def _gn_init(c, dtype=jnp.float32):
  return {"scale": jnp.ones((c,), dtype), "bias": jnp.zeros((c,), dtype)}


ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu, "tanh": jnp.tanh, "softplus": jax.nn.softplus,
    "gelu": jax.nn.gelu, "identity": lambda v: v,
}


def _activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# ----------------------------------------------------------------- losses

def cross_entropy(logits: jax.Array, example: PyTree) -> jax.Array:
  """Softmax cross-entropy of one example's ``logits [K]`` and ``example["label"]``."""
  return -jax.nn.log_softmax(logits)[example["label"]]


def classification_metrics(logits: jax.Array, example: PyTree) -> dict:
  return {"accuracy": (jnp.argmax(logits) == example["label"]).astype(jnp.float32)}


# ----------------------------------------------------------------- the FF conv net

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
  act = _activation(activation)
  height, width, c_in = (int(v) for v in image_shape)
  channels, hidden = tuple(int(c) for c in channels), tuple(int(h) for h in hidden)
  if not channels:
    raise ProblemError("ff_problem: channels needs at least the encoder width")
  # spatial sizes of each conv state
  shapes = []
  enc_pad = (enc_kernel - 1) // 2
  h = _out_size(height, enc_kernel, 1, enc_pad, enc_pad)
  w = _out_size(width, enc_kernel, 1, enc_pad, enc_pad)
  if pool_window:
    h, w = ((h - pool_window) // pool_stride + 1, (w - pool_window) // pool_stride + 1)
  shapes.append((h, w, channels[0]))
  for c in channels[1:]:
    h, w = _out_size(h, kernel, stride, padding, padding), _out_size(w, kernel, stride, padding, padding)
    shapes.append((h, w, c))
  if min(min(s[0], s[1]) for s in shapes) < 1:
    raise ProblemError(
        f"ff_problem: an image of {height}x{width} is too small for these layers "
        f"(spatial sizes {[s[:2] for s in shapes]}); use fewer conv layers, a smaller "
        "kernel/stride or no pooling")
  flat = int(np.prod(shapes[-1]))
  dense_sizes = (flat,) + hidden + (num_classes,)
  state_shapes = tuple(shapes) + tuple((n,) for n in hidden) + ((num_classes,),)

  def init_params(key, ex=None):
    dt = _float_dtype(ex)
    keys = jax.random.split(key, 1 + len(channels) + len(dense_sizes))
    params = {"enc": _conv_init(keys[0], enc_kernel, c_in, channels[0], dtype=dt)}
    params["conv"] = [_conv_init(keys[1 + i], kernel, ci, co, dtype=dt)
                      for i, (ci, co) in enumerate(zip(channels[:-1], channels[1:]))]
    params["dense"] = [_dense_init(keys[1 + len(channels) + j], ni, no, dt)
                       for j, (ni, no) in enumerate(zip(dense_sizes[:-1], dense_sizes[1:]))]
    return params

  def encode(params, x):
    e = conv2d(x, params["enc"]["w"], 1, enc_pad, conv_impl) + params["enc"]["b"]
    return max_pool(e, pool_window, pool_stride) if pool_window else e

  def dynamics(params, state, ex):
    drives = [encode(params, ex["x"])]
    for l, layer in enumerate(params["conv"]):
      drives.append(conv2d(act(state[l]), layer["w"], stride, padding, conv_impl) + layer["b"])
    n_conv = len(channels)
    prev = act(state[n_conv - 1]).reshape(-1)
    for j, layer in enumerate(params["dense"]):
      drives.append(prev @ layer["w"] + layer["b"])
      if j + 1 < len(params["dense"]):
        prev = act(state[n_conv + j])
    return tuple(d - s for d, s in zip(drives, state))

  def init_state(params, ex):
    return tuple(jnp.zeros(s, jnp.asarray(ex["x"]).dtype) for s in state_shapes)

  return BilevelProblem(
      dynamics=dynamics, loss=cross_entropy, output=lambda s: s[-1],
      init_state=init_state, init_params=init_params, metrics=classification_metrics,
      name="cifar10_ff", example=example)


def ff_depth(problem_options) -> int:
  """Number of Euler (dt=1) steps that reach the FF net's equilibrium exactly."""
  return len(tuple(problem_options.channels)) + len(tuple(problem_options.hidden)) + 1


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
  act = _activation(activation)
  height, width, c_in = (int(v) for v in image_shape)
  if channels % groups or inner_channels % groups:
    raise ProblemError(f"deq_problem: channels ({channels}) and inner_channels "
                       f"({inner_channels}) must be divisible by groups ({groups})")
  if height % pool or width % pool:
    raise ProblemError(f"deq_problem: image {height}x{width} not divisible by pool {pool}")
  n_read = (height // pool) * (width // pool) * channels

  def init_params(key, ex=None):
    dt = _float_dtype(ex)
    k = jax.random.split(key, 4)
    return {
        "enc": {**_conv_init(k[0], kernel, c_in, channels, dtype=dt),
                "gn": _gn_init(channels, dt)},
        "block": {"conv1": _conv_init(k[1], kernel, channels, inner_channels, bias=False,
                                      std=block_init_std, dtype=dt),
                  "conv2": _conv_init(k[2], kernel, inner_channels, channels, bias=False,
                                      std=block_init_std, dtype=dt),
                  "gn1": _gn_init(inner_channels, dt), "gn2": _gn_init(channels, dt),
                  "gn3": _gn_init(channels, dt)},
        "out": _dense_init(k[3], n_read, num_classes, dt),
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
      dynamics=dynamics, loss=cross_entropy, output=lambda s: s[-1],
      init_state=init_state, init_params=init_params, metrics=classification_metrics,
      name="cifar10_deq", example=example)


# ----------------------------------------------------------------- data and tasks

def _load_split(config, split: str) -> tuple[np.ndarray, np.ndarray, str]:
  """(x, y, provenance note) for ``split`` from files or TFDS; never random data."""
  from problems.datasets import cifar10 as cifar_files  # noqa: PLC0415
  opts = config.problem_options
  data_dir = config.data_dir or None
  source = opts.get("source", "files")
  if source == "tfds":
    x, y = cifar_files.load_cifar10_tfds(split, data_dir)
    return x, y, "CIFAR-10 from TFDS (lossless)"
  if source != "files":
    raise ValueError(f"problem_options.source must be 'files' or 'tfds', got {source!r}")
  x, y = cifar_files.load_cifar10(split, data_dir)  # raises if missing: never random data
  root = Path(data_dir or os.environ.get("BILEVEL_DATA_DIR", "")).expanduser()
  lossless = cifar_files._pickle_dir(root) is not None  # the loader's own preference order
  note = ("CIFAR-10 lossless python batches" if lossless else
          "CIFAR-10 LOSSY JPEG (q75) copy: pixels differ from the original; not "
          "comparable with published CIFAR-10 numbers")
  return x, y, note


def _subset(x, y, n: int, seed: int, tag: int):
  """A seeded random subset of size n (0 = all). Random, not the first n: the
  JPEG copy's test set is stored class by class."""
  if not n or n >= len(x):
    return x, y
  idx = np.random.default_rng([seed, tag]).permutation(len(x))[:n]
  idx.sort()
  return x[idx], y[idx]


def make_evaluator(problem: BilevelProblem, inputs: Callable[[np.ndarray], PyTree],
                   n: int, batch_size: int, reduce: Optional[Callable] = None):
  """``evaluate(params, solver) -> dict`` over ``n`` held-out examples at the
  solver's free equilibrium, in batches (the last one padded and masked).

  ``inputs(idx) -> batch`` gathers examples. Returns means of the loss, of
  ``problem.metrics`` and of the free relaxation's iterations / convergence;
  ``reduce(means) -> dict`` may add derived scores (e.g. PSNR from MSE).
  """
  cache: dict = {}

  def per_example_fn(solver):
    key = solver if _hashable(solver) else id(solver)
    if key not in cache:
      def run(params, batch):
        free = solver.free_equilibrium(problem, params, batch)
        out = jax.vmap(problem.output)(free.value)
        vals = {"loss": jax.vmap(problem.loss)(out, batch),
                "free/iterations": free.iterations.astype(jnp.float32),
                "free/converged_fraction": free.converged.astype(jnp.float32)}
        if problem.metrics is not None:
          vals.update(jax.vmap(problem.metrics)(out, batch))
        return vals
      cache[key] = jax.jit(run)
    return cache[key]

  def evaluate(params, solver) -> dict:
    fn = per_example_fn(solver)
    bs = min(batch_size, n)
    sums: dict = {}
    for start in range(0, n, bs):
      idx = np.arange(start, min(start + bs, n))
      valid = len(idx)
      if valid < bs:
        idx = np.concatenate([idx, np.zeros(bs - valid, idx.dtype)])
      vals = jax.device_get(fn(params, inputs(idx)))
      for k, v in vals.items():
        sums[k] = sums.get(k, 0.0) + float(np.sum(np.asarray(v, np.float64)[:valid]))
    means = {k: v / n for k, v in sums.items()}
    means["examples"] = float(n)
    if reduce is not None:
      means.update(reduce(means))
    return means

  return evaluate


def _hashable(obj) -> bool:
  try:
    hash(obj)
    return True
  except TypeError:
    return False


def _classification_task(config, make_problem: Callable[[PyTree], BilevelProblem]) -> Task:
  opts = config.problem_options
  x_train, y_train, note = _load_split(config, "train")
  x_test, y_test, _ = _load_split(config, "test")
  x_train, y_train = _subset(x_train, y_train, int(opts.get("train_examples", 0)), config.seed, 1)
  x_test, y_test = _subset(x_test, y_test, int(opts.get("eval_examples", 0)), config.seed, 2)
  example = {"x": jnp.asarray(x_train[0]), "label": jnp.asarray(y_train[0])}
  problem = make_problem(example)

  from problems.datasets import augment, get_batch, steps_per_epoch  # noqa: PLC0415
  spe = steps_per_epoch(len(x_train), config.batch_size)
  do_augment = bool(opts.get("augment", False))
  aug = jax.jit(augment, static_argnums=2)
  base_key = jax.random.key(config.seed)

  def train_batch(step: int) -> PyTree:
    x, y = get_batch(x_train, y_train, config.seed, step, config.batch_size)
    if do_augment:
      x = np.asarray(aug(jax.random.fold_in(base_key, step), jnp.asarray(x), 4))
    return {"x": x, "label": y}

  evaluate = make_evaluator(problem, lambda idx: {"x": x_test[idx], "label": y_test[idx]},
                            len(x_test), int(opts.get("eval_batch_size", 500)))
  notes = note + (" | augmentation: random crop (pad 4) + flip" if do_augment else "")
  if opts.get("train_examples", 0) or opts.get("eval_examples", 0):
    notes += (f" | subset: {len(x_train)} train / {len(x_test)} test examples "
              "(seeded random subsets)")
  return Task(problem=problem, example=example, steps_per_epoch=spe,
              train_batch=train_batch, evaluate=evaluate, notes=notes)


def build_ff(config) -> Task:
  """``cifar10_ff``: the convolutional feedforward net (Table 2, C10 FF)."""
  o = config.problem_options
  return _classification_task(config, lambda ex: ff_problem(
      (32, 32, 3), tuple(o.channels), tuple(o.hidden), 10,
      enc_kernel=o.enc_kernel, kernel=o.kernel, stride=o.stride, padding=o.padding,
      pool_window=o.pool_window, pool_stride=o.pool_stride, activation=o.activation,
      conv_impl=o.conv_impl, example=ex))


def build_deq(config) -> Task:
  """``cifar10_deq``: the deep equilibrium model (Table 2, C10 RNN)."""
  o = config.problem_options
  return _classification_task(config, lambda ex: deq_problem(
      (32, 32, 3), o.channels, o.inner_channels, 10, kernel=o.kernel, groups=o.groups,
      pool=o.pool, block_init_std=o.block_init_std, activation=o.get("activation", "relu"),
      conv_impl=o.conv_impl, example=ex))
