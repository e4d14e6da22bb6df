"""Omniglot with the pinned Vinyals et al. (2016) few-shot protocol.

Protocol (pinned; change only with a version note):

* Classes: one class per line of ``files/omniglot_vinyals_splits/{split}.txt``
  (``Alphabet/characterNN/rotDDD``), i.e. every character four times, rotated by
  0, 90, 180 and 270 degrees counter-clockwise (``np.rot90(img, k=DDD // 90)``).
  Class counts: train 4112, val 688, test 1692, trainval 4800. Every class has the
  20 drawings of its character, in drawer order.
* Pixels: the shipped images are binary 105x105 with 1 = white background,
  0 = ink. They are inverted so that **ink = 1.0 and background = 0.0**.
* Resize (``image_size != 105``): the inverted image as 8-bit greyscale
  (ink 255, background 0, PIL mode "L") is resized with
  ``PIL.Image.resize((image_size, image_size), Image.LANCZOS)``, then divided by 255
  (values in ``[0, 1]``, steps of 1/255). Rotation is applied *after* resizing, so the
  rotated classes are exact ``np.rot90`` copies of the unrotated one. Pillow's integer
  resampling is deterministic. ``image_size == 105`` returns the native binary images.
* Tasks: ``n_way`` distinct classes in random order get labels ``0..n_way-1``;
  per class, ``k_shot + n_query`` distinct drawers are drawn without replacement;
  the first ``k_shot`` are support, the rest query. Layout is class-major:
  ``support_y = [0]*k_shot + [1]*k_shot + ...``, ``query_y = [0]*n_query + ...``.
  Images get a trailing channel axis: ``[..., H, W, 1]``.

The 20 official one-shot runs (Lake et al. 2015) are available through
:func:`official_one_shot_runs`; they come from the evaluation alphabets, use unrotated
images, and may share characters with the Vinyals test split (expected).

Source and checks: ``/work/shared/data/PROVENANCE.md`` (omniglot.npz).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._files import SHIPPED_DIR, resolve_file
from .sampling import TAG_META_BATCH, TAG_TASK, make_rng

__all__ = [
    "SPLITS",
    "load_omniglot",
    "load_omniglot_metadata",
    "sample_task",
    "sample_meta_batch",
    "official_one_shot_runs",
]

SPLITS = ("train", "val", "test", "trainval")
NATIVE_SIZE = 105
N_DRAWERS = 20
_SPLITS_SUBDIR = "omniglot_vinyals_splits"
_CHUNK = 4096  # images unpacked at a time (bounds the temporary memory)


def _npz_path(data_dir: str | os.PathLike | None) -> Path:
    return resolve_file(data_dir, "omniglot.npz", "Omniglot file omniglot.npz").resolve()


def _splits_dir(npz_path: Path) -> Path:
    """Split lists next to the npz when present, else the shipped (pinned) ones."""
    local = npz_path.parent / _SPLITS_SUBDIR
    return local if local.is_dir() else SHIPPED_DIR / _SPLITS_SUBDIR


@functools.lru_cache(maxsize=2)
def _metadata(npz_path: Path) -> dict[str, np.ndarray]:
    with np.load(npz_path, allow_pickle=False) as d:
        meta = {k: d[k] for k in d.files if k != "images_packed"}
    for v in meta.values():
        v.flags.writeable = False
    return meta


def load_omniglot_metadata(data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """All arrays of omniglot.npz except the images (read-only).

    Per image ``[32460]`` (index ``char_id * 20 + drawer``): char_id, drawer, alphabet,
    char_in_alphabet, background, in_small1, in_small2; ``alphabet_names [50]``;
    one-shot runs ``run_train_idx``, ``run_test_idx``, ``run_answer`` ``[20, 20]``.
    """
    return _metadata(_npz_path(data_dir))


def _resize_chunk(ink: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [n, 105, 105] (ink 255) -> uint8 [n, S, S] with PIL LANCZOS."""
    out = np.empty((len(ink), image_size, image_size), np.uint8)
    size = (image_size, image_size)
    for i, img in enumerate(ink):  # PIL has no batched resize
        out[i] = np.asarray(Image.fromarray(img).resize(size, Image.LANCZOS))
    return out


@functools.lru_cache(maxsize=4)
def _all_images_uint8(npz_path: Path, image_size: int) -> np.ndarray:
    """Every image, unrotated, ink = 255: uint8 ``[1623, 20, S, S]`` (read-only, cached)."""
    with np.load(npz_path, allow_pickle=False) as d:
        packed = d["images_packed"]
    n = len(packed)
    out = np.empty((n, image_size, image_size), np.uint8)
    for s in range(0, n, _CHUNK):
        # Invert while still packed: bit 1 = ink afterwards.
        ink = np.unpackbits(~packed[s : s + _CHUNK], axis=-1, count=NATIVE_SIZE)
        ink *= np.uint8(255)
        out[s : s + _CHUNK] = ink if image_size == NATIVE_SIZE else _resize_chunk(ink, image_size)
    out = out.reshape(n // N_DRAWERS, N_DRAWERS, image_size, image_size)
    out.flags.writeable = False
    return out


def _parse_split(npz_path: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class names, their character index ``[C]`` and rotation ``k`` (quarter turns) ``[C]``."""
    path = _splits_dir(npz_path) / f"{split}.txt"
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    meta = _metadata(npz_path)
    first = meta["drawer"] == 0
    lookup = {
        (str(meta["alphabet_names"][a]), int(c) + 1): int(cid)
        for a, c, cid in zip(meta["alphabet"][first], meta["char_in_alphabet"][first], meta["char_id"][first])
    }
    chars = np.empty(len(names), np.int64)
    rots = np.empty(len(names), np.int64)
    for i, name in enumerate(names):
        try:
            alphabet, char, rot = name.split("/")
            key = (alphabet, int(char.removeprefix("character")))
            deg = int(rot.removeprefix("rot"))
            chars[i] = lookup[key]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: bad class line {name!r}") from e
        if deg % 90 or not 0 <= deg < 360:
            raise ValueError(f"{path}: rotation must be 0/90/180/270 in {name!r}")
        rots[i] = deg // 90
    return names, chars, rots


@functools.lru_cache(maxsize=4)
def _split_uint8(npz_path: Path, split: str, image_size: int) -> tuple[np.ndarray, tuple[str, ...]]:
    names, chars, rots = _parse_split(npz_path, split)
    base = _all_images_uint8(npz_path, image_size)
    out = np.empty((len(names), N_DRAWERS, image_size, image_size), np.uint8)
    for k in range(4):
        sel = np.flatnonzero(rots == k)
        out[sel] = np.rot90(base[chars[sel]], k=k, axes=(-2, -1))
    out.flags.writeable = False
    return out, tuple(names)


def load_omniglot(
    split: str = "train", image_size: int = 28, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, list[str]]:
    """Omniglot Vinyals ``split`` ('train', 'val', 'test', 'trainval'), rotations as extra classes.

    Returns ``images`` float32 ``[C, 20, image_size, image_size]`` (classes x drawers;
    ink = 1.0, background = 0.0; LANCZOS-resized as in the module docstring) and the
    ``C`` class names (``Alphabet/characterNN/rotDDD``). C = 4112 / 688 / 1692 / 4800.
    The resized images are cached in memory; the first call resizes all 32,460 images
    (a few seconds). ``data_dir``: None reads the shipped files; otherwise a path to an
    ``omniglot.npz`` or a folder holding one (split lists are read from
    ``omniglot_vinyals_splits/`` next to it when present, else the shipped lists).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= image_size <= NATIVE_SIZE:
        raise ValueError(f"image_size must be in [1, {NATIVE_SIZE}], got {image_size}")
    images, names = _split_uint8(_npz_path(data_dir), split, int(image_size))
    return images.astype(np.float32) / np.float32(255.0), list(names)


def _tasks(
    rng: np.random.Generator, images: np.ndarray, n_tasks: int, n_way: int, k_shot: int, n_query: int
) -> dict[str, np.ndarray]:
    """``n_tasks`` tasks from one generator, vectorised (layout: module docstring)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [classes, drawers, H, W], got shape {images.shape}")
    n_classes, n_drawers, h, w = images.shape
    if not 1 <= n_way <= n_classes:
        raise ValueError(f"n_way={n_way} must be in [1, {n_classes}] (number of classes)")
    per_class = k_shot + n_query
    if k_shot < 0 or n_query < 0 or not 1 <= per_class <= n_drawers:
        raise ValueError(f"need 0 <= k_shot, n_query and 1 <= k_shot + n_query <= {n_drawers}")
    # Random subsets without replacement: argsort of i.i.d. uniforms.
    classes = np.argsort(rng.random((n_tasks, n_classes)), axis=1)[:, :n_way]
    drawers = np.argsort(rng.random((n_tasks, n_way, n_drawers)), axis=2)[:, :, :per_class]
    x = images[classes[:, :, None], drawers]  # [T, n_way, k_shot + n_query, H, W]
    labels = np.arange(n_way, dtype=np.int32)
    return {
        "support_x": x[:, :, :k_shot].reshape(n_tasks, n_way * k_shot, h, w, 1),
        "support_y": np.broadcast_to(np.repeat(labels, k_shot), (n_tasks, n_way * k_shot)).copy(),
        "query_x": x[:, :, k_shot:].reshape(n_tasks, n_way * n_query, h, w, 1),
        "query_y": np.broadcast_to(np.repeat(labels, n_query), (n_tasks, n_way * n_query)).copy(),
    }


def sample_task(
    key_or_seed: Any,
    images: np.ndarray,
    n_way: int,
    k_shot: int,
    n_query: int,
    task_index: int = 0,
) -> dict[str, np.ndarray]:
    """One N-way K-shot task, a pure function of ``(seed, task_index)``.

    ``images`` ``[C, D, H, W]`` (from :func:`load_omniglot`). Returns
    ``support_x [n_way*k_shot, H, W, 1]``, ``support_y`` int32 ``[n_way*k_shot]``,
    ``query_x [n_way*n_query, H, W, 1]``, ``query_y`` int32 ``[n_way*n_query]``.
    ``key_or_seed``: non-negative int or JAX PRNG key (its words seed numpy).
    """
    rng = make_rng(key_or_seed, TAG_TASK, task_index)
    return {k: v[0] for k, v in _tasks(rng, images, 1, n_way, k_shot, n_query).items()}


def sample_meta_batch(
    seed: Any,
    step: int,
    images: np.ndarray,
    meta_batch_size: int,
    n_way: int,
    k_shot: int,
    n_query: int,
) -> dict[str, np.ndarray]:
    """``meta_batch_size`` tasks for training step ``step``; pure in ``(seed, step)`` (exact resume).

    Same keys as :func:`sample_task` with a leading task axis ``[meta_batch_size, ...]``.
    """
    if meta_batch_size < 1:
        raise ValueError(f"meta_batch_size must be positive, got {meta_batch_size}")
    rng = make_rng(seed, TAG_META_BATCH, step)
    return _tasks(rng, images, meta_batch_size, n_way, k_shot, n_query)


def official_one_shot_runs(
    image_size: int = 28, data_dir: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """The 20 official 20-way one-shot runs of Lake et al. (2015) as 20 tasks.

    Returns ``support_x`` float32 ``[20, 20, S, S, 1]`` (run ``r``'s 20 training images,
    ``class01..class20`` in order), ``support_y`` int32 ``[20, 20]`` (= 0..19),
    ``query_x`` ``[20, 20, S, S, 1]`` (``item01..item20``), ``query_y`` int32 ``[20, 20]``
    (the correct training class, from ``class_labels.txt``). Evaluation alphabets,
    unrotated, same pixel pipeline as :func:`load_omniglot`.
    """
    if not 1 <= image_size <= NATIVE_SIZE:
        raise ValueError(f"image_size must be in [1, {NATIVE_SIZE}], got {image_size}")
    npz_path = _npz_path(data_dir)
    meta = _metadata(npz_path)
    flat = _all_images_uint8(npz_path, int(image_size)).reshape(-1, image_size, image_size)

    def take(idx: np.ndarray) -> np.ndarray:
        return (flat[idx].astype(np.float32) / np.float32(255.0))[..., None]

    n_runs, n_way = meta["run_train_idx"].shape
    return {
        "support_x": take(meta["run_train_idx"]),
        "support_y": np.broadcast_to(np.arange(n_way, dtype=np.int32), (n_runs, n_way)).copy(),
        "query_x": take(meta["run_test_idx"]),
        "query_y": meta["run_answer"].astype(np.int32),
    }
