"""Data sets for the bilevel problems: MNIST, Omniglot (Vinyals protocol), CIFAR-10.

MNIST and Omniglot are shipped with the package (``files/``). CIFAR-10 is not: pass
``data_dir`` or set ``BILEVEL_DATA_DIR`` (lossless python batches, or the LOSSY JPEG q75
npz copy). Batches and tasks are pure functions of ``(seed, step)`` so resumed runs see
identical data. Provenance of every file: ``/work/shared/data/PROVENANCE.md``.
"""

from .cifar10 import CIFAR10_MEAN, CIFAR10_STD, augment, load_cifar10, load_cifar10_tfds
from .mnist import MNIST_MEAN, MNIST_STD, load_mnist, load_mnist_tfds
from .omniglot import (
    load_omniglot,
    load_omniglot_metadata,
    official_one_shot_runs,
    sample_meta_batch,
    sample_task,
)
from .sampling import batch_indices, epoch_permutation, get_batch, iterate_batches, steps_per_epoch

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "augment",
    "batch_indices",
    "epoch_permutation",
    "get_batch",
    "iterate_batches",
    "load_cifar10",
    "load_cifar10_tfds",
    "load_mnist",
    "load_mnist_tfds",
    "load_omniglot",
    "load_omniglot_metadata",
    "official_one_shot_runs",
    "sample_meta_batch",
    "sample_task",
    "steps_per_epoch",
]
