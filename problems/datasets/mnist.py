"""MNIST, from the copy shipped with the package (bit-identical to the original idx files).

See ``/work/shared/data/PROVENANCE.md`` (mnist.npz) for the source and checks.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from ._files import resolve_file

__all__ = ["MNIST_MEAN", "MNIST_STD", "load_mnist", "load_mnist_tfds"]

MNIST_MEAN = 0.1307  # train-set pixel mean on a 0..1 scale
MNIST_STD = 0.3081  # train-set pixel std on a 0..1 scale
_SPLITS = ("train", "test")
_TFDS_HINT = "load_mnist_tfds(split), needs `pip install -e .[tfds]`"


@functools.lru_cache(maxsize=4)
def _load_raw(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as d:
        x, y = d[f"x_{split}"], d[f"y_{split}"]
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _to_float(x_uint8: np.ndarray, normalize: bool) -> np.ndarray:
    x = x_uint8.reshape(len(x_uint8), -1).astype(np.float32) / np.float32(255.0)
    if normalize:
        x -= np.float32(MNIST_MEAN)
        x /= np.float32(MNIST_STD)
    return x


def load_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST ``split`` ('train': 60,000, 'test': 10,000) in original order.

    Returns ``x`` float32 ``[N, 784]`` (rows of the 28x28 image) and ``y`` int32 ``[N]``.
    ``x`` is ``(pixel / 255 - 0.1307) / 0.3081`` when ``normalize``, else ``pixel / 255``
    in ``[0, 1]``. ``data_dir``: None reads the shipped ``files/mnist.npz``; otherwise a
    path to an ``mnist.npz`` (keys x_train, y_train, x_test, y_test) or a folder holding one.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    path = resolve_file(data_dir, "mnist.npz", "MNIST file mnist.npz", _TFDS_HINT)
    x, y = _load_raw(path.resolve(), split)
    return _to_float(x, normalize), y.astype(np.int32)


def load_mnist_tfds(
    split: str = "train", data_dir: str | None = None, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from TensorFlow Datasets (downloads on first use); same layout as :func:`load_mnist`.

    Returns ``x`` float32 ``[N, 784]``, ``y`` int32 ``[N]``. ``data_dir`` is TFDS's own data dir.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_mnist_tfds needs tensorflow-datasets; install it with `pip install -e .[tfds]` "
            "(or use load_mnist, which reads the copy shipped with the package)"
        ) from e
    ds = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1, data_dir=data_dir))
    x = np.asarray(ds["image"], dtype=np.uint8)
    return _to_float(x, normalize), np.asarray(ds["label"], dtype=np.int32)
