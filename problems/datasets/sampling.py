"""Pure, seeded, resumable mini-batch sampling (numpy).

Every batch is a pure function of ``(seed, step)``: the epoch is
``step // steps_per_epoch`` and the position inside the epoch is
``step % steps_per_epoch``. Each epoch uses its own permutation, drawn from a
numpy ``SeedSequence`` spawned from ``(seed, epoch)``. The last partial batch of
every epoch is dropped, so each example appears at most once per epoch (exactly
once when ``batch_size`` divides ``n``). A run resumed from a checkpoint only
needs the step counter to see exactly the same batches as the original run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = [
    "seed_entropy",
    "make_rng",
    "steps_per_epoch",
    "epoch_permutation",
    "batch_indices",
    "get_batch",
    "iterate_batches",
]

# Domain tags, so that streams of different samplers never coincide.
TAG_EPOCH = 0
TAG_TASK = 1
TAG_META_BATCH = 2


def seed_entropy(key_or_seed: Any) -> tuple[int, ...]:
    """Turns an int seed or a JAX PRNG key into a tuple of non-negative ints.

    An ``int`` (or numpy integer) seed ``s >= 0`` gives ``(s,)``. A JAX key
    (typed ``jax.random.key`` or a raw ``uint32`` key array) gives its key words.
    """
    if isinstance(key_or_seed, (bool, np.bool_)):
        raise TypeError("seed must be an int or a JAX PRNG key, not bool")
    if isinstance(key_or_seed, (int, np.integer)):
        seed = int(key_or_seed)
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        return (seed,)
    data = key_or_seed
    dtype = getattr(key_or_seed, "dtype", None)
    if dtype is not None and "key" in str(dtype):  # typed JAX key
        import jax

        data = jax.random.key_data(key_or_seed)
    words = np.asarray(data)
    if words.dtype.kind not in "ui" or words.size == 0:
        raise TypeError(
            f"seed must be an int or a JAX PRNG key, got {type(key_or_seed).__name__} "
            f"with dtype {words.dtype}"
        )
    words = words.astype(np.uint64).ravel()
    return tuple(int(w) for w in words)


def make_rng(key_or_seed: Any, *stream: int) -> np.random.Generator:
    """numpy Generator for the stream ``(seed, *stream)`` (``stream``: non-negative ints)."""
    ss = np.random.SeedSequence(
        entropy=list(seed_entropy(key_or_seed)), spawn_key=tuple(int(s) for s in stream)
    )
    return np.random.default_rng(ss)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Number of full batches per epoch, ``n // batch_size`` (the partial batch is dropped)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    spe = n // batch_size
    if spe == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the data set ({n} examples)")
    return spe


@functools.lru_cache(maxsize=8)
def _cached_permutation(entropy: tuple[int, ...], epoch: int, n: int) -> np.ndarray:
    perm = make_rng(entropy, TAG_EPOCH, epoch).permutation(n)
    perm.flags.writeable = False
    return perm


def epoch_permutation(seed: Any, epoch: int, n: int) -> np.ndarray:
    """Permutation of ``range(n)`` used in ``epoch``; int64 ``[n]``, pure in ``(seed, epoch, n)``.

    The returned array is read-only (it is cached).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}")
    return _cached_permutation(seed_entropy(seed), int(epoch), int(n))


def batch_indices(seed: Any, step: int, n: int, batch_size: int) -> np.ndarray:
    """Example indices of batch ``step``; int64 ``[batch_size]``.

    ``epoch = step // (n // batch_size)``; the indices are the slice
    ``[i * batch_size, (i + 1) * batch_size)`` of that epoch's permutation,
    with ``i = step % (n // batch_size)``.
    """
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    spe = steps_per_epoch(n, batch_size)
    epoch, i = divmod(int(step), spe)
    return epoch_permutation(seed, epoch, n)[i * batch_size : (i + 1) * batch_size]


def get_batch(
    x: np.ndarray, y: np.ndarray, seed: Any, step: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``step``: ``(x[idx], y[idx])`` with ``idx = batch_indices(seed, step, len(x), batch_size)``.

    Shapes: ``x [N, ...] -> [batch_size, ...]``, ``y [N, ...] -> [batch_size, ...]``.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    idx = batch_indices(seed, step, len(x), batch_size)
    return x[idx], y[idx]


def iterate_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    key_or_seed: Any,
    epochs: int | None = None,
    start_step: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``get_batch(x, y, seed, step, batch_size)`` for ``step = start_step, start_step + 1, ...``.

    Stops after ``epochs`` full epochs (counted from step 0, so a resumed
    iterator stops at the same place), or never when ``epochs`` is None.
    """
    spe = steps_per_epoch(len(x), batch_size)
    stop = None if epochs is None else epochs * spe
    step = start_step
    while stop is None or step < stop:
        yield get_batch(x, y, key_or_seed, step, batch_size)
        step += 1
