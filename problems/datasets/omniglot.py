"""Omniglot few-shot data: the pinned Vinyals et al. (2016) protocol, or the CML recipe.

Two protocols (``protocol=`` of :func:`load_omniglot`; both pinned, change only with a
version note). ``"vinyals"`` (the default) is described first; ``"cml"`` after it.

Protocol ``"vinyals"``:

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

Protocol ``"cml"`` (the recipe behind the CML / LCP Omniglot numbers; sources with
file:line references in ``docs/omniglot_protocol.md``):

* Classes: split by alphabet, no meta-validation split. ``train`` = the 964 characters
  of the 30 *background* alphabets, each also rotated by 90, 180 and 270 degrees as new
  classes (3856 classes: the 964 unrotated ones, then the 964 rotated by 90, ...).
  ``test`` = the 659 characters of the 20 *evaluation* alphabets, **unrotated**
  (659 classes). 'val' and 'trainval' do not exist (ValueError).
* Pixels: ink = 1.0, background = 0.0, as above; but resized with PIL **BILINEAR**
  (torchvision ``Resize``'s default, antialiased by PIL when shrinking), and rotated
  *before* resizing (the recipe's order: class augmentation, then ``Resize``). Bilinear
  resizing does not commute exactly with ``rot90`` (off by one grey level in places),
  so the rotated classes are resized from rotated 105x105 images.
* Tasks: the same samplers and layout as above.

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
    "PROTOCOLS",
    "CML_SPLITS",
    "load_omniglot",
    "load_omniglot_metadata",
    "sample_task",
    "sample_meta_batch",
    "official_one_shot_runs",
]

SPLITS = ("train", "val", "test", "trainval")
PROTOCOLS = ("vinyals", "cml")
CML_SPLITS = ("train", "test")
# Resize filter per protocol: the pinned Vinyals pipeline uses LANCZOS; the CML recipe
# uses torchvision Resize's default (PIL BILINEAR).
_RESAMPLE = {"vinyals": Image.LANCZOS, "cml": Image.BILINEAR}
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


def _resize_chunk(ink: np.ndarray, image_size: int, resample: int = Image.LANCZOS) -> np.ndarray:
    """uint8 [n, 105, 105] (ink 255) -> uint8 [n, S, S] with PIL ``resample``."""
    out = np.empty((len(ink), image_size, image_size), np.uint8)
    size = (image_size, image_size)
    for i, img in enumerate(ink):  # PIL has no batched resize
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(size, resample))
    return out


def _images_uint8(
    npz_path: Path, image_size: int, resample: int, quarter_turns: int, chars: np.ndarray
) -> np.ndarray:
    """Images of characters ``chars``, ink = 255, rotated by ``quarter_turns`` x 90 degrees
    counter-clockwise at 105x105 and then resized: uint8 ``[len(chars), 20, S, S]``."""
    with np.load(npz_path, allow_pickle=False) as d:
        packed = d["images_packed"]
    idx = (np.asarray(chars, np.int64)[:, None] * N_DRAWERS + np.arange(N_DRAWERS)).ravel()
    out = np.empty((len(idx), image_size, image_size), np.uint8)
    for s in range(0, len(idx), _CHUNK):
        # Invert while still packed: bit 1 = ink afterwards.
        ink = np.unpackbits(~packed[idx[s : s + _CHUNK]], axis=-1, count=NATIVE_SIZE)
        ink *= np.uint8(255)
        ink = np.rot90(ink, k=quarter_turns, axes=(-2, -1))
        out[s : s + _CHUNK] = ink if image_size == NATIVE_SIZE else _resize_chunk(ink, image_size, resample)
    return out.reshape(len(chars), N_DRAWERS, image_size, image_size)


@functools.lru_cache(maxsize=4)
def _all_images_uint8(npz_path: Path, image_size: int, resample: int = Image.LANCZOS) -> np.ndarray:
    """Every image, unrotated, ink = 255: uint8 ``[1623, 20, S, S]`` (read-only, cached)."""
    n_chars = len(_metadata(npz_path)["char_id"]) // N_DRAWERS
    out = _images_uint8(npz_path, image_size, int(resample), 0, np.arange(n_chars))
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
    base = _all_images_uint8(npz_path, image_size, _RESAMPLE["vinyals"])
    out = np.empty((len(names), N_DRAWERS, image_size, image_size), np.uint8)
    for k in range(4):
        sel = np.flatnonzero(rots == k)
        out[sel] = np.rot90(base[chars[sel]], k=k, axes=(-2, -1))
    out.flags.writeable = False
    return out, tuple(names)


@functools.lru_cache(maxsize=2)
def _cml_split_uint8(npz_path: Path, split: str, image_size: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """The CML recipe's split: background alphabets x 4 rotations, or evaluation unrotated."""
    meta = _metadata(npz_path)
    first = np.flatnonzero(meta["drawer"] == 0)  # one row per character, in char_id order
    background = meta["background"][first]
    chars = meta["char_id"][first][background if split == "train" else ~background].astype(np.int64)
    alphabets = meta["alphabet_names"][meta["alphabet"][first[chars]]]
    numbers = meta["char_in_alphabet"][first[chars]].astype(np.int64) + 1
    base = [f"{a}/character{n:02d}" for a, n in zip(alphabets, numbers)]
    turns = range(4) if split == "train" else range(1)  # rotated classes at meta-train only
    resample = _RESAMPLE["cml"]
    blocks = [
        _all_images_uint8(npz_path, image_size, resample)[chars]
        if k == 0
        else _images_uint8(npz_path, image_size, resample, k, chars)
        for k in turns
    ]
    out = np.concatenate(blocks)
    out.flags.writeable = False
    return out, tuple(f"{b}/rot{90 * k:03d}" for k in turns for b in base)


def _check_args(split: str, image_size: int, protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "cml" and split not in CML_SPLITS:
        raise ValueError(
            f"protocol 'cml' has splits {CML_SPLITS} (background / evaluation alphabets) and no "
            f"meta-validation split, got {split!r}"
        )
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= image_size <= NATIVE_SIZE:
        raise ValueError(f"image_size must be in [1, {NATIVE_SIZE}], got {image_size}")


def load_omniglot(
    split: str = "train",
    image_size: int = 28,
    data_dir: str | os.PathLike | None = None,
    protocol: str = "vinyals",
) -> tuple[np.ndarray, list[str]]:
    """Omniglot ``split`` under ``protocol`` ('vinyals' or 'cml'; module docstring).

    'vinyals': ``split`` in 'train', 'val', 'test', 'trainval', rotations as extra
    classes everywhere; C = 4112 / 688 / 1692 / 4800; LANCZOS resize.
    'cml': ``split`` in 'train' (30 background alphabets, rotations as extra classes,
    C = 3856) or 'test' (20 evaluation alphabets, unrotated, C = 659); BILINEAR resize.

    Returns ``images`` float32 ``[C, 20, image_size, image_size]`` (classes x drawers;
    ink = 1.0, background = 0.0) and the ``C`` class names
    (``Alphabet/characterNN/rotDDD``). The resized images are cached in memory; the first
    call resizes all 32,460 images (a few seconds). ``data_dir``: None reads the shipped
    files; otherwise a path to an ``omniglot.npz`` or a folder holding one (Vinyals split
    lists are read from ``omniglot_vinyals_splits/`` next to it when present, else the
    shipped lists).
    """
    _check_args(split, image_size, protocol)
    if protocol == "cml":
        images, names = _cml_split_uint8(_npz_path(data_dir), split, int(image_size))
    else:
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
    image_size: int = 28, data_dir: str | os.PathLike | None = None, protocol: str = "vinyals"
) -> dict[str, np.ndarray]:
    """The 20 official 20-way one-shot runs of Lake et al. (2015) as 20 tasks.

    Returns ``support_x`` float32 ``[20, 20, S, S, 1]`` (run ``r``'s 20 training images,
    ``class01..class20`` in order), ``support_y`` int32 ``[20, 20]`` (= 0..19),
    ``query_x`` ``[20, 20, S, S, 1]`` (``item01..item20``), ``query_y`` int32 ``[20, 20]``
    (the correct training class, from ``class_labels.txt``). Evaluation alphabets,
    unrotated, same pixel pipeline as :func:`load_omniglot` under ``protocol``.
    """
    _check_args("test", image_size, protocol)
    npz_path = _npz_path(data_dir)
    meta = _metadata(npz_path)
    flat = _all_images_uint8(npz_path, int(image_size), _RESAMPLE[protocol])
    flat = flat.reshape(-1, image_size, image_size)

    def take(idx: np.ndarray) -> np.ndarray:
        return (flat[idx].astype(np.float32) / np.float32(255.0))[..., None]

    n_runs, n_way = meta["run_train_idx"].shape
    return {
        "support_x": take(meta["run_train_idx"]),
        "support_y": np.broadcast_to(np.arange(n_way, dtype=np.int32), (n_runs, n_way)).copy(),
        "query_x": take(meta["run_test_idx"]),
        "query_y": meta["run_answer"].astype(np.int32),
    }
