"""Implicit neural representation (Table 2, INR): fit ONE image, config -> Task.

The model is :mod:`problems.models.inr` (an equilibrium RNN on Fourier features
of a pixel's coordinates); the score is the PSNR ``10 log10(1 / MSE)`` (pixel
values in [0, 1]) over a pixel set.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from problems.base import Task
from problems.datasets import sampling
from problems.evaluation import Evaluator
from problems.models.inr import fourier_matrix, inr_problem

PyTree = Any

__all__ = ["load_image", "pixel_grid", "build", "psnr"]

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


def psnr(mse: float) -> float:
  """PSNR in dB of a mean squared error on [0, 1] pixel values."""
  return float("inf") if mse <= 0 else -10.0 * math.log10(mse)


def build(config: Any) -> Task:
  """``inr``: fit one image (see the module docstring for the protocol)."""
  o = config.problem_options
  size = int(o.size)
  if size % 2:
    raise ValueError(f"problem_options.size must be even (train grid = every other pixel), "
                     f"got {size}")
  image = load_image(o.image, size)
  coords = pixel_grid(size)
  c = image.shape[-1]
  train = {"coords": coords[::2, ::2].reshape(-1, 2), "rgb": image[::2, ::2].reshape(-1, c)}
  test = {"coords": coords.reshape(-1, 2), "rgb": image.reshape(-1, c)}
  n_train, n_full = size * size // 4, size * size

  b_matrix = fourier_matrix(int(o.fourier_features), float(o.fourier_scale),
                            int(o.feature_seed))
  example = jax.tree.map(lambda a: jnp.asarray(a[0]), train)
  problem = inr_problem(b_matrix, int(o.hidden), c, activation=o.activation,
                        recurrent_scale=float(o.recurrent_scale),
                        spectral_bound=float(o.spectral_bound),
                        power_iterations=int(o.power_iterations), example=example)

  def train_batch(step: int) -> PyTree:
    x, y = sampling.get_batch(train["coords"], train["rgb"], config.seed, step,
                              config.batch_size)
    return {"coords": x, "rgb": y}

  evaluator = Evaluator(problem, num_devices=int(config.get("num_devices", 0) or 0))
  bs = int(o.eval_batch_size)

  def evaluate(params, solver) -> dict:
    out = evaluator.mean(params, solver, test, bs)
    train_mse = evaluator.mean(params, solver, train, bs)["mse"]
    # held-out MSE from the full-grid and train-grid sums (disjoint sets)
    mse_held = (out["mse"] * n_full - train_mse * n_train) / (n_full - n_train)
    return {**out, "examples": float(n_full), "psnr": psnr(out["mse"]),
            "psnr_heldout": psnr(mse_held), "psnr_train": psnr(train_mse),
            "train_mse": train_mse}

  notes = (f"INR on ONE image ({o.image}, {size}x{size}, {c} channel(s)); trained on the "
           f"{size // 2}x{size // 2} even grid, psnr on the full grid, psnr_heldout on the "
           "other 3/4 of the pixels. The paper reports a natural-image data set.")
  return Task(problem=problem, example=example,
              steps_per_epoch=sampling.steps_per_epoch(n_train, config.batch_size),
              train_batch=train_batch, evaluate=evaluate, notes=notes)
