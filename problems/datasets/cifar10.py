"""CIFAR-10 loader (not shipped with the package: pass ``data_dir`` or set ``BILEVEL_DATA_DIR``).

Two on-disk formats are read from ``data_dir``, in this order of preference:

1. The standard CIFAR-10 python batches, lossless:
   ``data_dir/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (or ``data_dir``
   being that folder itself).
2. The LOSSY JPEG (quality 75) copy ``data_dir/cifar10_jpeg_{train,test}.npz`` (keys
   ``jpeg_bytes``, ``offsets``, ``labels``, ``class_names``; see
   ``/work/shared/data/PROVENANCE.md``). Its pixels are NOT the original CIFAR-10 pixels
   (mean abs error about 5.8 grey levels) and its test set is stored class by class;
   results on it are not comparable with published CIFAR-10 numbers without saying so.
   A warning is emitted (once per process) whenever it is used. Decoded arrays are
   cached in ``~/.cache/bilevel/`` (or ``$BILEVEL_CACHE_DIR``, or
   ``$XDG_CACHE_HOME/bilevel``), keyed by the source file's name, size and mtime and the
   Pillow version, and written atomically.

Never falls back to random data: a missing file raises FileNotFoundError.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import PIL
from PIL import Image

from ._files import DATA_DIR_ENV, missing_file_error

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CLASS_NAMES",
    "load_cifar10",
    "load_cifar10_tfds",
    "augment",
    "cache_dir",
    "pickle_dir",
]

log = logging.getLogger(__name__)

# Canonical per-channel statistics of the lossless CIFAR-10 training set (0..1 scale).
# Used for both formats, so the JPEG copy is normalised the same way (its own train
# means/stds differ slightly: 0.4913/0.4821/0.4465 and 0.2452/0.2428/0.2606).
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_SPLITS = ("train", "test")
_PICKLE_DIR = "cifar-10-batches-py"
_PICKLE_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_TFDS_HINT = "load_cifar10_tfds(split), needs `pip install -e .[tfds]`"
_LOSSY_WARNED = False


def cache_dir() -> Path:
    """Folder for decoded-array caches: $BILEVEL_CACHE_DIR, else $XDG_CACHE_HOME/bilevel, else ~/.cache/bilevel."""
    if os.environ.get("BILEVEL_CACHE_DIR"):
        return Path(os.environ["BILEVEL_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "bilevel"


def _warn_lossy(path: Path) -> None:
    global _LOSSY_WARNED
    if not _LOSSY_WARNED:
        _LOSSY_WARNED = True
        warnings.warn(
            f"CIFAR-10 is read from {path}, a LOSSY JPEG (quality 75) copy: pixels differ from "
            "the original CIFAR-10 (mean abs error ~5.8/255) and results are not comparable "
            f"with published CIFAR-10 numbers. Put the lossless '{_PICKLE_DIR}' batches in the "
            "data dir to use the original pixels.",
            UserWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------- python pickle batches


def pickle_dir(data_dir: Path) -> Path | None:
    """The folder of the lossless python batches under ``data_dir`` (or ``data_dir``
    itself), or None: the loader reads these before the lossy JPEG copy."""
    for d in (data_dir / _PICKLE_DIR, data_dir):
        if (d / "test_batch").is_file() or (d / "data_batch_1").is_file():
            return d
    return None


def _read_pickle_batches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in _PICKLE_FILES[split]:
        path = folder / name
        if not path.is_file():
            raise missing_file_error(f"CIFAR-10 batch {name}", path, _TFDS_HINT)
        with open(path, "rb") as f:
            # The official batches are pickles: only open files you trust.
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int32))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


# ---------------------------------------------------------------- lossy JPEG npz


def _decode_jpegs(jpeg_bytes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 32, 32, 3]`` from concatenated JPEG files (Pillow, RGB)."""
    n = len(offsets) - 1
    out = np.empty((n, 32, 32, 3), np.uint8)
    buf = jpeg_bytes.tobytes()
    for i in range(n):  # JPEG decoding cannot be vectorised
        with Image.open(io.BytesIO(buf[offsets[i] : offsets[i + 1]])) as im:
            arr = np.asarray(im.convert("RGB"))
        if arr.shape != (32, 32, 3):
            raise ValueError(f"JPEG image {i} decodes to shape {arr.shape}, expected (32, 32, 3)")
        out[i] = arr
    return out


def _cache_path(src: Path) -> Path:
    st = src.stat()
    where = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:8]
    key = f"{src.stem}-{where}-{st.st_size}-{st.st_mtime_ns}-pil{PIL.__version__}"
    return cache_dir() / f"{key}.npy"


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_jpeg_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as d:
        labels = d["labels"].astype(np.int32)
        n = len(labels)
        cached = _cache_path(path)
        x = None
        if cached.is_file():
            try:
                x = np.load(cached, allow_pickle=False)
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable cache %s: %s", cached, e)
            if x is not None and (x.shape != (n, 32, 32, 3) or x.dtype != np.uint8):
                log.warning("ignoring cache %s with shape %s", cached, x.shape)
                x = None
        if x is None:
            log.info("decoding %d JPEG images from %s (lossy copy of CIFAR-10)", n, path)
            x = _decode_jpegs(d["jpeg_bytes"], d["offsets"])
            try:
                _atomic_save(cached, x)
            except OSError as e:
                log.warning("could not write cache %s: %s", cached, e)
    return x, labels


# ---------------------------------------------------------------- public API


def _normalize(x_uint8: np.ndarray) -> np.ndarray:
    x = x_uint8.astype(np.float32) / np.float32(255.0)
    x -= CIFAR10_MEAN
    x /= CIFAR10_STD
    return x


def load_cifar10(
    split: str = "train", data_dir: str | os.PathLike | None = None, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 ``split`` ('train': 50,000, 'test': 10,000).

    Returns ``x`` float32 ``[N, 32, 32, 3]`` (``(pixel/255 - CIFAR10_MEAN) / CIFAR10_STD``
    per channel when ``normalize``, else ``pixel/255``) and ``y`` int32 ``[N]``.
    ``data_dir`` defaults to ``$BILEVEL_DATA_DIR``. Reads the lossless python batches when
    present, else the LOSSY JPEG (q75) npz copy (warns once; see module docstring).
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    if data_dir is None:
        raise missing_file_error(f"CIFAR-10 ({DATA_DIR_ENV} is not set, no data_dir given)", [], _TFDS_HINT)
    root = Path(data_dir).expanduser()
    folder = pickle_dir(root)
    if folder is not None:
        x, y = _read_pickle_batches(folder, split)
        log.info("CIFAR-10 %s: lossless python batches from %s", split, folder)
    else:
        npz = root / f"cifar10_jpeg_{split}.npz"
        if not npz.is_file():
            raise missing_file_error(
                f"CIFAR-10 {split} data", [root / _PICKLE_DIR / _PICKLE_FILES[split][0], npz], _TFDS_HINT
            )
        _warn_lossy(npz)
        x, y = _read_jpeg_npz(npz)
        log.info("CIFAR-10 %s: LOSSY JPEG (q75) copy from %s", split, npz)
    return (_normalize(x) if normalize else x.astype(np.float32) / np.float32(255.0)), y


def load_cifar10_tfds(
    split: str = "train", data_dir: str | None = None, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from TensorFlow Datasets (lossless); same layout as :func:`load_cifar10`."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_cifar10_tfds needs tensorflow-datasets; install it with `pip install -e .[tfds]`"
        ) from e
    ds = tfds.as_numpy(tfds.load("cifar10", split=split, batch_size=-1, data_dir=data_dir))
    x = np.asarray(ds["image"], dtype=np.uint8)
    y = np.asarray(ds["label"], dtype=np.int32)
    return (_normalize(x) if normalize else x.astype(np.float32) / np.float32(255.0)), y


def augment(key: jax.Array, x: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop (zero padding by ``pad``) and random horizontal flip, per example.

    ``x`` ``[B, H, W, C]`` -> ``[B, H, W, C]``. Padding is 0 in the input's (normalised)
    space, i.e. the mean colour for normalised images. Pure and jit-able (``pad`` static).
    """
    b, h, w, c = x.shape
    k_off, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_off, (b, 2), 0, 2 * pad + 1)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop(img: jax.Array, off: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    out = jax.vmap(crop)(padded, offsets)
    return jnp.where(flip[:, None, None, None], out[:, :, ::-1, :], out)
