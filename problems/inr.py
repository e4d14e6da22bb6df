"""Implicit neural representation (Table 2, INR): fit an image with a
coordinate-to-colour network whose core is an equilibrium (recurrent) layer.

One example is one pixel: ``{"coords": [2] in [0, 1), "rgb": [c] in [0, 1]}``.
The coordinates are lifted by fixed random Fourier features (Tancik et al.
2020) ``gamma(p) = [sin(2 pi B p), cos(2 pi B p)]``, ``B ~ N(0, scale^2)``
(``[m, 2]``, drawn once from ``feature_seed``, not trained), and drive an
equilibrium RNN (eq. 11) whose read-out is a block of the state, so that every
weight is in ``theta`` and the output units are a state component:

    f_h   = -h   + W sigma(h) + U gamma(p) + b     (W spectrally normalised)
    f_rgb = -rgb + D sigma(h) + d

The loss is the pixel's mean squared error over channels; the score is the
PSNR ``10 log10(1 / MSE)`` (pixel values in [0, 1]) over a pixel set.

Protocol (Tancik et al. / Fathony et al.'s "natural images" setup, on ONE
image): the image is centre-cropped and resized to ``size x size``; the model
is trained on the regular ``size/2 x size/2`` sub-grid (even rows and columns)
and tested on the full ``size x size`` grid (``psnr``) and on the held-out
pixels only (``psnr_heldout``). The paper's numbers are over a data set of
natural images; results here are for the single image named in the config.

Images: ``astronaut``, ``camera``, ``coffee``, ``chelsea`` ... from
scikit-image (optional extra: ``pip install scikit-image``), ``grace_hopper``
from matplotlib's sample data (always installed), or a path to an image file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from bilevel.problem import BilevelProblem
from problems.base import Task
from problems.cifar import ACTIVATIONS, _float_dtype, make_evaluator

PyTree = Any

__all__ = ["load_image", "pixel_grid", "fourier_matrix", "inr_problem", "build", "psnr"]

MATPLOTLIB_IMAGES = {"grace_hopper": "grace_hopper.jpg"}


def load_image(name: str, size: int) -> np.ndarray:
  """float32 ``[size, size, c]`` in [0, 1] (c = 3 for colour, 1 for grey images).

  ``name``: a scikit-image sample (``skimage.data.<name>()``), ``grace_hopper``
  (matplotlib sample data) or a path to an image file. Centre-cropped to a
  square, then resized with Pillow's bicubic filter.
  """
  if os.sep in name or "/" in name or Path(name).suffix:
    path = Path(name).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"INR image file {path} not found; fix "
                              "--config.problem_options.image=PATH or use a sample name "
                              "such as 'astronaut' or 'grace_hopper'")
    with Image.open(path) as im:
      arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
  elif name in MATPLOTLIB_IMAGES:
    import matplotlib.cbook  # noqa: PLC0415
    with Image.open(matplotlib.cbook.get_sample_data(MATPLOTLIB_IMAGES[name],
                                                     asfileobj=False)) as im:
      arr = np.asarray(im.convert("RGB"))
  else:
    try:
      import skimage.data  # noqa: PLC0415
    except ImportError as e:
      raise ImportError(
          f"INR image {name!r} comes from scikit-image, which is not installed: "
          "`pip install scikit-image` (the project's optional extra), or use "
          "--config.problem_options.image=grace_hopper (matplotlib sample data) or a "
          "path to an image file") from e
    if not hasattr(skimage.data, name):
      raise ValueError(f"unknown INR image {name!r}: not a scikit-image sample "
                       "(e.g. astronaut, camera, coffee, chelsea), not 'grace_hopper' "
                       "and not a file path")
    arr = np.asarray(getattr(skimage.data, name)())
  if arr.ndim == 3 and arr.shape[-1] == 4:
    arr = arr[..., :3]
  h, w = arr.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  arr = arr[top:top + side, left:left + side]
  im = Image.fromarray(arr.astype(np.uint8) if arr.dtype != np.uint8 else arr)
  if side != size:
    im = im.resize((size, size), Image.BICUBIC)
  out = np.asarray(im, np.float32) / np.float32(255.0)
  return out[..., None] if out.ndim == 2 else out


def pixel_grid(size: int) -> np.ndarray:
  """float32 ``[size, size, 2]`` coordinates ``(row, col) / size`` in [0, 1)."""
  r = np.arange(size, dtype=np.float32) / np.float32(size)
  return np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1)


def fourier_matrix(num_features: int, scale: float, seed: int) -> np.ndarray:
  """The fixed ``B [num_features, 2] ~ N(0, scale^2)`` of the Fourier features."""
  return (scale * np.random.default_rng(seed).standard_normal((num_features, 2))
          ).astype(np.float32)


def psnr(mse: float) -> float:
  """PSNR in dB of a mean squared error on [0, 1] pixel values."""
  return float("inf") if mse <= 0 else -10.0 * math.log10(mse)


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
  if activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}")
  act = ACTIVATIONS[activation]
  b_matrix = jnp.asarray(b_matrix)
  n_feat = 2 * b_matrix.shape[0]

  probe = jnp.asarray(np.random.default_rng(12345).standard_normal(hidden), jnp.float32)

  def recurrent(w):
    """W rescaled so that its spectral norm is at most ``spectral_bound`` (if > 0)."""
    if not spectral_bound:
      return w
    v = probe / jnp.linalg.norm(probe)
    for _ in range(power_iterations):  # power iteration on W^T W (unrolled)
      v = w.T @ (w @ v)
      v = v / jnp.linalg.norm(v)
    sigma = jnp.linalg.norm(w @ v)
    return w * jnp.minimum(1.0, spectral_bound / sigma)

  def features(p):
    proj = 2.0 * jnp.pi * (b_matrix @ p)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)])

  def init_params(key, ex=None):
    dt = _float_dtype(ex, "coords")
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

  def metrics(rgb, ex):
    return {"mse": jnp.mean(jnp.square(rgb - ex["rgb"]))}

  return BilevelProblem(dynamics=dynamics, loss=loss, output=lambda s: s[1],
                        init_state=init_state, init_params=init_params, metrics=metrics,
                        name="inr", example=example)


def build(config) -> Task:
  """``inr``: fit one image (see the module docstring for the protocol)."""
  o = config.problem_options
  size = int(o.size)
  if size % 2:
    raise ValueError(f"problem_options.size must be even (train grid = every other pixel), "
                     f"got {size}")
  image = load_image(o.image, size)
  coords = pixel_grid(size)
  c = image.shape[-1]
  train_coords = coords[::2, ::2].reshape(-1, 2)
  train_rgb = image[::2, ::2].reshape(-1, c)
  test_coords, test_rgb = coords.reshape(-1, 2), image.reshape(-1, c)
  heldout = np.ones((size, size), bool)
  heldout[::2, ::2] = False
  heldout = heldout.reshape(-1)

  b_matrix = fourier_matrix(int(o.fourier_features), float(o.fourier_scale),
                            int(o.feature_seed))
  example = {"coords": jnp.asarray(train_coords[0]), "rgb": jnp.asarray(train_rgb[0])}
  problem = inr_problem(b_matrix, int(o.hidden), c, activation=o.activation,
                        recurrent_scale=float(o.recurrent_scale),
                        spectral_bound=float(o.spectral_bound),
                        power_iterations=int(o.power_iterations), example=example)

  from problems.datasets import get_batch, steps_per_epoch  # noqa: PLC0415
  spe = steps_per_epoch(len(train_coords), config.batch_size)

  def train_batch(step: int) -> PyTree:
    x, y = get_batch(train_coords, train_rgb, config.seed, step, config.batch_size)
    return {"coords": x, "rgb": y}

  bs = int(o.eval_batch_size)
  full = make_evaluator(problem, lambda idx: {"coords": test_coords[idx], "rgb": test_rgb[idx]},
                        len(test_coords), bs)
  on_train = make_evaluator(problem,
                            lambda idx: {"coords": train_coords[idx], "rgb": train_rgb[idx]},
                            len(train_coords), bs)
  held_idx = np.flatnonzero(heldout)

  def evaluate(params, solver) -> dict:
    out = full(params, solver)
    train = on_train(params, solver)
    # held-out MSE from the full-grid and train-grid sums (disjoint sets)
    n_full, n_train = len(test_coords), len(train_coords)
    mse_held = (out["mse"] * n_full - train["mse"] * n_train) / len(held_idx)
    out.update({"psnr": psnr(out["mse"]), "psnr_heldout": psnr(mse_held),
                "psnr_train": psnr(train["mse"]), "train_mse": train["mse"]})
    return out

  notes = (f"INR on ONE image ({o.image}, {size}x{size}, {c} channel(s)); trained on the "
           f"{size // 2}x{size // 2} even grid, psnr on the full grid, psnr_heldout on the "
           "other 3/4 of the pixels. The paper reports a natural-image data set.")
  return Task(problem=problem, example=example, steps_per_epoch=spe,
              train_batch=train_batch, evaluate=evaluate, notes=notes)
