"""Tests for problems/datasets (MNIST, Omniglot, CIFAR-10 loaders and the samplers)."""

from __future__ import annotations

import io
import pickle
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from problems import datasets as ds
from problems.datasets import cifar10 as cifar_mod
from problems.datasets import omniglot as omni_mod

# ------------------------------------------------------------------------------ MNIST


@pytest.fixture(scope="module")
def mnist_train():
    return ds.load_mnist("train")


def test_mnist_shapes_and_labels(mnist_train):
    x, y = mnist_train
    assert x.shape == (60000, 784) and x.dtype == np.float32
    assert y.shape == (60000,) and y.dtype == np.int32
    assert np.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    xt, yt = ds.load_mnist("test")
    assert xt.shape == (10000, 784) and yt.shape == (10000,)
    assert np.bincount(yt).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_normalisation(mnist_train):
    x, _ = mnist_train
    assert abs(float(x.mean(dtype=np.float64))) < 1e-3
    assert abs(float(x.std(dtype=np.float64)) - 1.0) < 1e-3
    raw, _ = ds.load_mnist("test", normalize=False)
    assert raw.min() == 0.0 and raw.max() == 1.0
    xt, _ = ds.load_mnist("test")
    np.testing.assert_allclose(xt, (raw - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)


def test_mnist_data_dir_override_and_missing(tmp_path):
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=np.array([3, 4], np.uint8), x_test=x, y_test=np.array([1, 2], np.uint8))
    for where in (tmp_path, tmp_path / "mnist.npz"):
        xs, ys = ds.load_mnist("test", data_dir=where, normalize=False)
        assert ys.tolist() == [1, 2]
        np.testing.assert_array_equal(np.rint(xs * 255).astype(np.uint8), x.reshape(2, -1))
    with pytest.raises(FileNotFoundError, match="BILEVEL_DATA_DIR") as err:
        ds.load_mnist("train", data_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


# ------------------------------------------------------------------------------ sampler


def test_sampler_deterministic_and_resumable():
    x = np.arange(103)[:, None] * np.ones((1, 3))
    y = np.arange(103)
    a = [ds.get_batch(x, y, 7, s, 10)[1] for s in range(25)]
    b = [ds.get_batch(x, y, 7, s, 10)[1] for s in range(25)]
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    # Resuming at step 13 gives exactly the same batches as a run from 0.
    it = ds.iterate_batches(x, y, 10, 7, start_step=13)
    for s in range(13, 25):
        xb, yb = next(it)
        np.testing.assert_array_equal(yb, a[s])
        np.testing.assert_array_equal(xb[:, 0], yb)
    # Different seeds differ; a JAX key works as a seed and is deterministic.
    assert not np.array_equal(ds.get_batch(x, y, 8, 0, 10)[1], a[0])
    key = jax.random.key(3)
    np.testing.assert_array_equal(ds.get_batch(x, y, key, 4, 10)[1], ds.get_batch(x, y, jax.random.key(3), 4, 10)[1])
    assert len(list(ds.iterate_batches(x, y, 10, 7, epochs=2))) == 20


def test_sampler_every_example_once_per_epoch():
    n, bs = 100, 20
    spe = ds.steps_per_epoch(n, bs)
    assert spe == 5
    for epoch in range(3):
        idx = np.concatenate([ds.batch_indices(1, epoch * spe + i, n, bs) for i in range(spe)])
        assert sorted(idx.tolist()) == list(range(n))
        np.testing.assert_array_equal(idx, ds.epoch_permutation(1, epoch, n))
    assert not np.array_equal(ds.epoch_permutation(1, 0, n), ds.epoch_permutation(1, 1, n))
    # Partial last batch dropped: 103 examples, batch 10 -> 10 steps, 100 distinct indices.
    idx = np.concatenate([ds.batch_indices(0, s, 103, 10) for s in range(10)])
    assert len(np.unique(idx)) == 100


# ------------------------------------------------------------------------------ Omniglot


@pytest.fixture(scope="module")
def omni_train():
    return ds.load_omniglot("train")


def test_omniglot_split_class_counts(omni_train):
    x, names = omni_train
    assert x.shape == (4112, 20, 28, 28) and x.dtype == np.float32
    assert len(names) == 4112 and len(set(names)) == 4112
    for split, c in (("val", 688), ("test", 1692)):
        xs, ns = ds.load_omniglot(split)
        assert xs.shape == (c, 20, 28, 28) and len(ns) == c
    assert 0.0 <= x.min() and x.max() <= 1.0
    # Ink = 1, background = 0: mostly background.
    assert 0.02 < float(x.mean()) < 0.2
    assert float(np.median(x)) == 0.0


def test_omniglot_rotation_classes(omni_train):
    x, names = omni_train
    pos = {n: i for i, n in enumerate(names)}
    base = [n for n in names if n.endswith("rot000")]
    assert len(base) == 1028
    for k, deg in ((1, "090"), (2, "180"), (3, "270")):
        i0 = np.array([pos[n] for n in base])
        ik = np.array([pos[n[: -3] + deg] for n in base])
        np.testing.assert_array_equal(x[ik], np.rot90(x[i0], k=k, axes=(-2, -1)))


def test_omniglot_pixels_follow_pinned_protocol(omni_train):
    x, names = omni_train
    meta = ds.load_omniglot_metadata()
    i = names.index("Angelic/character01/rot000")
    alpha = list(meta["alphabet_names"]).index("Angelic")
    k = np.flatnonzero((meta["alphabet"] == alpha) & (meta["char_in_alphabet"] == 0) & (meta["drawer"] == 5))[0]
    with np.load(omni_mod.SHIPPED_DIR / "omniglot.npz") as d:
        bits = np.unpackbits(d["images_packed"][k], axis=-1, count=105)
    ink = ((1 - bits) * 255).astype(np.uint8)
    want = np.asarray(Image.fromarray(ink).resize((28, 28), Image.LANCZOS)) / 255.0
    np.testing.assert_allclose(x[i, 5], want, atol=1e-7)


def _coded_images(n_classes: int = 30, n_drawers: int = 20) -> np.ndarray:
    """[C, D, 2, 2] images whose pixels encode (class, drawer)."""
    img = np.zeros((n_classes, n_drawers, 2, 2), np.float32)
    img[..., 0, 0] = np.arange(n_classes)[:, None]
    img[..., 0, 1] = np.arange(n_drawers)[None, :]
    return img


def test_task_sampler_layout_and_determinism():
    images = _coded_images()
    n_way, k_shot, n_query = 5, 2, 3
    t = ds.sample_task(11, images, n_way, k_shot, n_query, task_index=4)
    assert t["support_x"].shape == (10, 2, 2, 1) and t["query_x"].shape == (15, 2, 2, 1)
    assert t["support_y"].dtype == np.int32 and t["query_y"].dtype == np.int32
    assert t["support_y"].tolist() == np.repeat(np.arange(5), 2).tolist()
    assert t["query_y"].tolist() == np.repeat(np.arange(5), 3).tolist()
    sc, sd = t["support_x"][:, 0, 0, 0], t["support_x"][:, 0, 1, 0]
    qc, qd = t["query_x"][:, 0, 0, 0], t["query_x"][:, 0, 1, 0]
    cls = sc[::k_shot]
    assert len(set(cls.tolist())) == n_way  # distinct classes
    np.testing.assert_array_equal(sc, cls[t["support_y"]])
    np.testing.assert_array_equal(qc, cls[t["query_y"]])
    for label in range(n_way):  # distinct drawers, support and query disjoint
        used = np.concatenate([sd[t["support_y"] == label], qd[t["query_y"] == label]])
        assert len(set(used.tolist())) == k_shot + n_query
    t2 = ds.sample_task(11, images, n_way, k_shot, n_query, task_index=4)
    for key in t:
        np.testing.assert_array_equal(t[key], t2[key])
    t3 = ds.sample_task(11, images, n_way, k_shot, n_query, task_index=5)
    assert not np.array_equal(t["support_x"], t3["support_x"])


def test_meta_batch_deterministic_from_seed_and_step(omni_train):
    x, _ = omni_train
    a = ds.sample_meta_batch(3, 17, x, 8, 5, 1, 15)
    assert a["support_x"].shape == (8, 5, 28, 28, 1) and a["query_x"].shape == (8, 75, 28, 28, 1)
    assert a["support_y"].shape == (8, 5) and a["query_y"].shape == (8, 75)
    assert (a["support_y"] == np.arange(5)).all()
    b = ds.sample_meta_batch(3, 17, x, 8, 5, 1, 15)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = ds.sample_meta_batch(3, 18, x, 8, 5, 1, 15)
    assert not np.array_equal(a["support_x"], c["support_x"])
    coded = ds.sample_meta_batch(0, 0, _coded_images(), 4, 5, 1, 2)
    classes = coded["support_x"][:, :, 0, 0, 0]
    assert all(len(set(row.tolist())) == 5 for row in classes)
    np.testing.assert_array_equal(coded["query_x"][:, :, 0, 0, 0], np.repeat(classes, 2, axis=1))


def test_official_one_shot_runs():
    runs = ds.official_one_shot_runs()
    assert runs["support_x"].shape == (20, 20, 28, 28, 1) and runs["query_x"].shape == (20, 20, 28, 28, 1)
    assert (runs["support_y"] == np.arange(20)).all()
    meta = ds.load_omniglot_metadata()
    np.testing.assert_array_equal(runs["query_y"], meta["run_answer"])
    char = meta["char_id"].astype(np.int64)
    train_char = char[meta["run_train_idx"]]  # [run, class]
    test_char = char[meta["run_test_idx"]]  # [run, item]
    np.testing.assert_array_equal(np.take_along_axis(train_char, runs["query_y"], axis=1), test_char)
    assert (~meta["background"][meta["run_train_idx"]]).all()  # evaluation alphabets
    # Pixels: same pipeline as load_omniglot (flat image index = char_id * 20 + drawer).
    flat = omni_mod._all_images_uint8(omni_mod._npz_path(None), 28).reshape(-1, 28, 28)
    np.testing.assert_array_equal(runs["support_x"][..., 0] * 255, flat[meta["run_train_idx"]].astype(np.float32))


# ------------------------------------------------------------------- Omniglot, CML protocol


@pytest.fixture(scope="module")
def omni_cml():
    return ds.load_omniglot("train", protocol="cml"), ds.load_omniglot("test", protocol="cml")


def _native_ink(flat_index: int) -> np.ndarray:
    """Image ``flat_index`` of omniglot.npz at 105x105, ink = 255 (uint8)."""
    with np.load(omni_mod.SHIPPED_DIR / "omniglot.npz") as d:
        bits = np.unpackbits(d["images_packed"][flat_index], axis=-1, count=105)
    return ((1 - bits) * 255).astype(np.uint8)


def test_omniglot_cml_classes_and_disjoint_alphabets(omni_cml):
    (xtr, ntr), (xte, nte) = omni_cml
    assert xtr.shape == (3856, 20, 28, 28) and xte.shape == (659, 20, 28, 28)
    assert xtr.dtype == np.float32 and len(set(ntr)) == 3856 and len(set(nte)) == 659
    # Meta-test: unrotated. Meta-train: every character in all four rotations.
    assert all(n.endswith("/rot000") for n in nte)
    chars_tr = {n.rsplit("/", 1)[0] for n in ntr}
    assert len(chars_tr) == 964
    assert sorted(n.rsplit("/", 1)[1] for n in ntr) == sorted(["rot000", "rot090", "rot180", "rot270"] * 964)
    # Alphabets: the 30 background ones for meta-train, the 20 evaluation ones for meta-test.
    meta = ds.load_omniglot_metadata()
    names = meta["alphabet_names"]
    alpha_tr, alpha_te = {n.split("/")[0] for n in ntr}, {n.split("/")[0] for n in nte}
    assert alpha_tr == {str(a) for a in names[np.unique(meta["alphabet"][meta["background"]])]}
    assert alpha_te == {str(a) for a in names[np.unique(meta["alphabet"][~meta["background"]])]}
    assert len(alpha_tr) == 30 and len(alpha_te) == 20 and not alpha_tr & alpha_te
    assert 0.0 <= xte.min() and xte.max() <= 1.0 and 0.02 < float(xte.mean()) < 0.2


def test_omniglot_cml_pixels_bilinear_rotate_then_resize(omni_cml):
    (xtr, ntr), (xte, nte) = omni_cml
    meta = ds.load_omniglot_metadata()

    def flat(alphabet: str, char: int, drawer: int) -> int:
        a = list(meta["alphabet_names"]).index(alphabet)
        sel = (meta["alphabet"] == a) & (meta["char_in_alphabet"] == char - 1) & (meta["drawer"] == drawer)
        return int(np.flatnonzero(sel)[0])

    def bilinear(img: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((28, 28), Image.BILINEAR)) / 255.0

    ink = _native_ink(flat("Angelic", 1, 5))
    np.testing.assert_allclose(xte[nte.index("Angelic/character01/rot000"), 5], bilinear(ink), atol=1e-7)
    train_alpha = ntr[0].split("/")[0]
    ink = _native_ink(flat(train_alpha, 3, 7))
    for k, deg in ((0, "000"), (1, "090"), (2, "180"), (3, "270")):
        got = xtr[ntr.index(f"{train_alpha}/character03/rot{deg}"), 7]
        # Rotated at 105x105 (counter-clockwise, like PIL's rotate), then resized.
        np.testing.assert_allclose(got, bilinear(np.rot90(ink, k)), atol=1e-7)


def test_omniglot_cml_protocol_errors_and_sampling(omni_cml):
    for split in ("val", "trainval"):
        with pytest.raises(ValueError, match="no meta-validation"):
            ds.load_omniglot(split, protocol="cml")
    with pytest.raises(ValueError, match="protocol"):
        ds.load_omniglot("train", protocol="maml")
    _, (xte, _) = omni_cml
    a = ds.sample_meta_batch(1234, 0, xte, 4, 20, 1, 15)
    b = ds.sample_meta_batch(1234, 0, xte, 4, 20, 1, 15)
    assert a["support_x"].shape == (4, 20, 28, 28, 1) and a["query_x"].shape == (4, 300, 28, 28, 1)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    runs = ds.official_one_shot_runs(protocol="cml")  # same pixels as the CML meta-test
    assert runs["support_x"].shape == (20, 20, 28, 28, 1)
    k = int(ds.load_omniglot_metadata()["run_train_idx"][0, 0])
    want = np.asarray(Image.fromarray(_native_ink(k)).resize((28, 28), Image.BILINEAR)) / 255.0
    np.testing.assert_allclose(runs["support_x"][0, 0, ..., 0], want, atol=1e-7)


# ------------------------------------------------------------------------------ CIFAR-10


def _tiny_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth images so JPEG round-trips closely.
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)


def _write_jpeg_npz(path, images: np.ndarray, labels: np.ndarray) -> None:
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=75)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(
        path,
        jpeg_bytes=np.concatenate(blobs),
        offsets=offsets,
        labels=labels.astype(np.uint8),
        class_names=np.array(cifar_mod.CLASS_NAMES),
    )


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("BILEVEL_CACHE_DIR", str(d))
    monkeypatch.setattr(cifar_mod, "_LOSSY_WARNED", False)
    return d


def test_cifar_jpeg_npz(tmp_path, cache, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    images = {"train": _tiny_images(12, 0), "test": _tiny_images(5, 1)}
    labels = {"train": np.arange(12) % 10, "test": np.array([9, 8, 7, 6, 5])}
    for split in images:
        _write_jpeg_npz(data / f"cifar10_jpeg_{split}.npz", images[split], labels[split])
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(data))
    with pytest.warns(UserWarning, match="LOSSY JPEG"):
        x, y = ds.load_cifar10("train", normalize=False)
    assert x.shape == (12, 32, 32, 3) and x.dtype == np.float32
    assert y.dtype == np.int32 and y.tolist() == labels["train"].tolist()
    u8 = np.rint(x * 255).astype(np.uint8)
    blob = np.load(data / "cifar10_jpeg_train.npz")
    first = blob["jpeg_bytes"][blob["offsets"][0] : blob["offsets"][1]].tobytes()
    np.testing.assert_array_equal(u8[0], np.asarray(Image.open(io.BytesIO(first)).convert("RGB")))
    assert np.abs(u8.astype(int) - images["train"]).mean() < 16  # lossy (q75, chroma subsampled) but close
    assert len(list(cache.glob("cifar10_jpeg_train-*.npy"))) == 1
    assert not list(cache.glob("*.tmp"))
    # Second load: from the cache (decoding disabled), warns no more, normalised.
    monkeypatch.setattr(cifar_mod, "_decode_jpegs", lambda *a: pytest.fail("cache not used"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xn, y2 = ds.load_cifar10("train", data_dir=data)
    np.testing.assert_allclose(xn, (x - ds.CIFAR10_MEAN) / ds.CIFAR10_STD, rtol=1e-5, atol=1e-5)
    assert y2.tolist() == y.tolist()
    # Changing the source file (size/mtime) invalidates the cache.
    monkeypatch.undo()
    monkeypatch.setenv("BILEVEL_CACHE_DIR", str(cache))
    monkeypatch.setattr(cifar_mod, "_LOSSY_WARNED", True)  # already warned in this process
    xt, yt = ds.load_cifar10("test", data_dir=data)
    assert xt.shape == (5, 32, 32, 3) and yt.tolist() == [9, 8, 7, 6, 5]
    _write_jpeg_npz(data / "cifar10_jpeg_test.npz", _tiny_images(7, 2), np.arange(7))
    xt, yt = ds.load_cifar10("test", data_dir=data)
    assert xt.shape == (7, 32, 32, 3) and yt.tolist() == list(range(7))
    assert len(list(cache.glob("cifar10_jpeg_test-*.npy"))) == 2


def _write_pickle_batches(folder, images: dict[str, list[np.ndarray]], labels: dict[str, list[list[int]]]) -> None:
    folder.mkdir(parents=True)
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    for split in names:
        for name, img, lab in zip(names[split], images[split], labels[split]):
            data = img.transpose(0, 3, 1, 2).reshape(len(img), 3072)  # CHW rows, as in the original
            with open(folder / name, "wb") as f:
                pickle.dump({b"batch_label": name.encode(), b"labels": lab, b"data": data, b"filenames": []}, f)


def test_cifar_pickle_batches(tmp_path, cache):
    images = {"train": [_tiny_images(3, s) for s in range(5)], "test": [_tiny_images(4, 9)]}
    labels = {"train": [[s, s + 1, s + 2] for s in range(5)], "test": [[1, 2, 3, 4]]}
    _write_pickle_batches(tmp_path / "cifar-10-batches-py", images, labels)
    # A JPEG copy next to it must be ignored in favour of the lossless batches.
    _write_jpeg_npz(tmp_path / "cifar10_jpeg_train.npz", _tiny_images(2, 5), np.array([0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y = ds.load_cifar10("train", data_dir=tmp_path, normalize=False)
        xt, yt = ds.load_cifar10("test", data_dir=tmp_path / "cifar-10-batches-py")
    assert x.shape == (15, 32, 32, 3) and y.tolist() == sum(labels["train"], [])
    np.testing.assert_array_equal(np.rint(x * 255).astype(np.uint8), np.concatenate(images["train"]))
    want = (images["test"][0] / np.float32(255) - ds.CIFAR10_MEAN) / ds.CIFAR10_STD
    np.testing.assert_allclose(xt, want, rtol=1e-5, atol=1e-5)
    assert yt.dtype == np.int32 and yt.tolist() == [1, 2, 3, 4]
    assert not cache.exists()


def test_cifar_missing_files(tmp_path, monkeypatch):
    monkeypatch.delenv("BILEVEL_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="BILEVEL_DATA_DIR") as err:
        ds.load_cifar10("train")
    assert "data_dir" in str(err.value) and "TFDS" in str(err.value)
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="BILEVEL_DATA_DIR") as err:
        ds.load_cifar10("test")
    assert str(tmp_path / "cifar10_jpeg_test.npz") in str(err.value)


def test_augment_crop_and_flip():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8, 8, 2)).astype(np.float32)
    out = np.asarray(jax.jit(ds.augment, static_argnames="pad")(jax.random.key(1), x, pad=2))
    assert out.shape == x.shape
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(len(x)):
        crops = [padded[i, a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
        candidates = crops + [c[:, ::-1] for c in crops]
        assert any(np.array_equal(out[i], c) for c in candidates)
    again = np.asarray(ds.augment(jax.random.key(1), x, pad=2))
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, np.asarray(ds.augment(jax.random.key(2), x, pad=2)))
