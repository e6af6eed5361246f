"""Tests for asose_jax.data: loaders (fake batches dir, local download, real pack), splits, augmentation."""
from __future__ import annotations

import hashlib
import pickle
import socket
import sys
import tarfile
import time
import types

import jax
import numpy as np
import pytest

from asose_jax import data
from asose_jax.config import DataConfig
from asose_jax.data import (CIFAR_MEAN, CIFAR_STD, Split, augment_batch, epoch_permutation, load_cifar10_dir,
                            load_dataset, normalize, split_arch_val, synthetic_cifar)
from asose_jax.errors import DataError

PER_BATCH = 20


# ---------------------------------------------------------------------------------------------- helpers

def _write_batch(path, images, labels):
    planar = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fake", b"labels": [int(v) for v in labels], b"data": planar,
                     b"filenames": [b"x.png"] * len(images)}, f, protocol=2)


def _fake_cifar(root, seed=0):
    """Write root/cifar-10-batches-py with 5 x PER_BATCH train and PER_BATCH test images; return the arrays."""
    rng = np.random.default_rng(seed)
    out = root / "cifar-10-batches-py"
    out.mkdir(parents=True)
    x_train = rng.integers(0, 256, (5 * PER_BATCH, 32, 32, 3), dtype=np.uint8)
    y_train = rng.integers(0, 10, 5 * PER_BATCH)
    x_test = rng.integers(0, 256, (PER_BATCH, 32, 32, 3), dtype=np.uint8)
    y_test = rng.integers(0, 10, PER_BATCH)
    for b in range(5):
        sl = slice(b * PER_BATCH, (b + 1) * PER_BATCH)
        _write_batch(out / f"data_batch_{b + 1}", x_train[sl], y_train[sl])
    _write_batch(out / "test_batch", x_test, y_test)
    return out, (x_train, y_train, x_test, y_test)


@pytest.fixture
def fake_tarball(tmp_path):
    """A local cifar-10-python.tar.gz holding a fake batches dir: (path, md5, arrays)."""
    src, arrays = _fake_cifar(tmp_path / "src")
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return tar_path, hashlib.md5(tar_path.read_bytes()).hexdigest(), arrays


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No ASOSE_DATA_DIR, a private cache dir, and no tensorflow_datasets."""
    monkeypatch.delenv("ASOSE_DATA_DIR", raising=False)
    monkeypatch.setenv("ASOSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    return tmp_path / "cache"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- synthetic

def test_synthetic_shapes_dtypes_determinism():
    train, test = synthetic_cifar(200, 50, seed=3)
    assert train.images.shape == (200, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels.shape == (200,) and train.labels.dtype == np.int32
    assert test.images.shape == (50, 32, 32, 3) and test.labels.shape == (50,)
    assert np.array_equal(np.bincount(train.labels, minlength=10), np.full(10, 20))
    again, _ = synthetic_cifar(200, 50, seed=3)
    other, _ = synthetic_cifar(200, 50, seed=4)
    assert np.array_equal(train.images, again.images) and np.array_equal(train.labels, again.labels)
    assert not np.array_equal(train.images, other.images)
    assert train.images.std() > 20  # noisy, not constant templates


def test_synthetic_is_learnable():
    """A nearest-class-mean classifier (far weaker than a convnet) is well above chance on test."""
    train, test = synthetic_cifar(500, 200, seed=0)
    x_tr = train.images.reshape(len(train.labels), -1).astype(np.float32)
    x_te = test.images.reshape(len(test.labels), -1).astype(np.float32)
    means = np.stack([x_tr[train.labels == c].mean(0) for c in range(10)])
    pred = np.argmin(((x_te[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == test.labels).mean() > 0.6


# ---------------------------------------------------------------------------------------------- splits

def test_split_arch_val_disjoint_covering_seeded():
    n = 100
    split = Split(np.repeat(np.arange(n, dtype=np.uint8), 32 * 32 * 3).reshape(n, 32, 32, 3),
                  np.arange(n, dtype=np.int32))
    tr, val = split_arch_val(split, 30, seed=1)
    assert len(tr) == 70 and len(val) == 30
    assert set(tr.labels).isdisjoint(val.labels)
    assert sorted(np.concatenate([tr.labels, val.labels])) == list(range(n))
    assert np.array_equal(tr.images[:, 0, 0, 0], tr.labels)  # images travel with their labels
    tr2, val2 = split_arch_val(split, 30, seed=1)
    _, val3 = split_arch_val(split, 30, seed=2)
    assert np.array_equal(val.labels, val2.labels) and np.array_equal(tr.labels, tr2.labels)
    assert not np.array_equal(val.labels, val3.labels)
    for bad in (0, n, n + 1):
        with pytest.raises(DataError):
            split_arch_val(split, bad, seed=1)


def test_epoch_permutation():
    p = epoch_permutation(seed=0, epoch_id=0, n=103, batch_size=10)
    assert p.shape == (10, 10) and p.dtype == np.int32
    assert len(np.unique(p)) == 100 and p.min() >= 0 and p.max() < 103  # drop_last, no repeats
    assert np.array_equal(p, epoch_permutation(0, 0, 103, 10))
    assert not np.array_equal(p, epoch_permutation(0, 1, 103, 10))
    assert not np.array_equal(p, epoch_permutation(1, 0, 103, 10))
    assert epoch_permutation(0, 0, 10, 10).shape == (1, 10)
    with pytest.raises(DataError):
        epoch_permutation(0, 0, 9, 10)


# ---------------------------------------------------------------------------------------------- augmentation

def test_normalize_constants_and_formula():
    np.testing.assert_allclose(CIFAR_MEAN, np.array([0.4914, 0.4822, 0.4465]) * 255, rtol=1e-6)
    np.testing.assert_allclose(CIFAR_STD, np.array([0.2023, 0.1994, 0.2010]) * 255, rtol=1e-6)
    x = np.zeros((2, 32, 32, 3), np.uint8)
    x[..., 0], x[..., 1], x[..., 2] = 125, 123, 114  # the rounded means: normalise to ~0
    out = np.asarray(normalize(x))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), (x[0, 0, 0] - CIFAR_MEAN) / CIFAR_STD, atol=1e-6)
    assert np.abs(out).max() < 0.01
    y = _images()
    np.testing.assert_allclose(np.asarray(normalize(y)), (y.astype(np.float32) - CIFAR_MEAN) / CIFAR_STD, atol=1e-6)


def test_augment_shape_dtype_determinism_jit():
    x = _images()
    key = jax.random.PRNGKey(0)
    out = augment_batch(key, x, crop=True, flip=True, cutout=8)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(augment_batch(key, x, True, True, 8)))
    assert not np.array_equal(np.asarray(out), np.asarray(augment_batch(jax.random.PRNGKey(1), x, True, True, 8)))
    jitted = jax.jit(augment_batch, static_argnums=(2, 3, 4))
    np.testing.assert_allclose(np.asarray(jitted(key, x, True, True, 8)), np.asarray(out), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(augment_batch(key, x, False, False)), np.asarray(normalize(x)))


def test_augment_flip_only_matches_manual_flip():
    x = _images(32)
    out = np.asarray(augment_batch(jax.random.PRNGKey(3), x, crop=False, flip=True))
    plain, mirrored = np.asarray(normalize(x)), np.asarray(normalize(x[:, :, ::-1, :]))
    is_plain = np.all(out == plain, axis=(1, 2, 3))
    is_flipped = np.all(out == mirrored, axis=(1, 2, 3))
    assert np.all(is_plain ^ is_flipped)  # every example is exactly one of the two
    assert 4 <= is_flipped.sum() <= 28  # p = 0.5 over 32 examples


def test_augment_crop_only_is_a_padded_window():
    x = _images(16)
    out = np.asarray(augment_batch(jax.random.PRNGKey(5), x, crop=True, flip=False))
    padded = np.asarray(normalize(np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))))
    offsets = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if np.array_equal(out[i], padded[i, dy:dy + 32, dx:dx + 32])]
        assert len(hits) == 1, f"example {i} is not a unique window of the padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 3  # per-example offsets, not one shared offset


def test_augment_cutout_zeroes_a_clipped_square():
    x = _images(32)
    out = np.asarray(augment_batch(jax.random.PRNGKey(7), x, crop=False, flip=False, cutout=8))
    ref = np.asarray(normalize(x))  # never exactly 0: the means are not integers
    for i in range(len(x)):
        hole = np.all(out[i] == 0.0, axis=-1)
        assert np.array_equal(out[i][~hole], ref[i][~hole])
        rows, cols = np.nonzero(hole.any(1))[0], np.nonzero(hole.any(0))[0]
        assert 1 <= len(rows) <= 8 and 1 <= len(cols) <= 8
        assert hole.sum() == len(rows) * len(cols)  # a rectangle
        assert hole[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert any(np.all(out[i] == 0.0, axis=-1).sum() < 64 for i in range(len(x)))  # some clipped at a border


# ---------------------------------------------------------------------------------------------- batches dir

def test_load_cifar10_dir_roundtrip(tmp_path):
    batches, (x_train, y_train, x_test, y_test) = _fake_cifar(tmp_path)
    for path in (batches, tmp_path):  # the dir itself or its parent
        train, test = load_cifar10_dir(path, verify=False)  # fake batches: their md5s are no known ones
        assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
        np.testing.assert_array_equal(train.images, x_train)
        np.testing.assert_array_equal(train.labels, y_train)
        np.testing.assert_array_equal(test.images, x_test)
        np.testing.assert_array_equal(test.labels, y_test)
    with open(batches / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    # the on-disk layout: 1024 R (row-major), then 1024 G, then 1024 B
    assert train.images[0, 0, 1, 0] == raw[0, 1] and train.images[0, 1, 0, 0] == raw[0, 32]
    assert train.images[0, 0, 0, 1] == raw[0, 1024] and train.images[0, 31, 31, 2] == raw[0, 3071]


def test_load_cifar10_dir_errors(tmp_path):
    with pytest.raises(DataError, match="data directory not found: .*nowhere"):
        load_cifar10_dir(tmp_path / "nowhere")
    batches, _ = _fake_cifar(tmp_path)
    (batches / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3") as exc:
        load_cifar10_dir(tmp_path)
    assert "\n" not in str(exc.value)
    _fake_cifar(tmp_path / "b")
    test_batch = tmp_path / "b" / "cifar-10-batches-py" / "test_batch"
    blob = test_batch.read_bytes()
    test_batch.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="test_batch") as exc:
        load_cifar10_dir(tmp_path / "b")
    assert "corrupted" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("bad", ["labels", "shape"])
def test_load_cifar10_dir_bad_content(tmp_path, bad):
    batches, _ = _fake_cifar(tmp_path)
    x = _images(PER_BATCH)
    if bad == "labels":
        labels = np.full(PER_BATCH, 3)
        labels[5] = 10
        _write_batch(batches / "data_batch_2", x, labels)
    else:
        with open(batches / "data_batch_2", "wb") as f:
            pickle.dump({b"data": np.zeros((PER_BATCH, 3000), np.uint8), b"labels": [0] * PER_BATCH}, f)
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar10_dir(tmp_path)


# ---------------------------------------------------------------------------------------------- load_dataset

def test_load_dataset_synthetic_subsets():
    cfg = DataConfig(source="synthetic", synthetic_train=200, synthetic_test=40, arch_val_size=50,
                     train_subset=100, test_subset=30)
    ds = load_dataset(cfg, seed=0)
    assert ds.source == "synthetic" and ds.num_classes == 10
    assert (len(ds.train.labels), len(ds.arch_val.labels), len(ds.test.labels)) == (100, 50, 30)
    with pytest.raises(DataError, match="arch_val_size"):
        load_dataset(DataConfig(source="synthetic", synthetic_train=200, arch_val_size=200), seed=0)


def test_load_dataset_dir_sources(tmp_path, clean_env, monkeypatch):
    _fake_cifar(tmp_path / "d")
    with pytest.raises(DataError, match="ASOSE_DATA_DIR"):
        load_dataset(DataConfig(source="dir", arch_val_size=10), seed=0)
    monkeypatch.setenv("ASOSE_DATA_DIR", str(tmp_path / "d"))
    for source in ("dir", "auto"):
        ds = load_dataset(DataConfig(source=source, arch_val_size=10, verify=False), seed=0)
        assert ds.source == f"dir:{(tmp_path / 'd').resolve()}"
        assert (len(ds.train.labels), len(ds.arch_val.labels), len(ds.test.labels)) == (90, 10, PER_BATCH)
    with pytest.raises(DataError, match="missing"):  # cfg.dir wins over ASOSE_DATA_DIR
        load_dataset(DataConfig(source="auto", dir=str(tmp_path / "missing"), arch_val_size=10), seed=0)


def test_load_dataset_tfds(clean_env, monkeypatch):
    with pytest.raises(DataError, match="tensorflow_datasets is not installed.*download_and_prepare"):
        load_dataset(DataConfig(source="tfds", arch_val_size=10), seed=0)
    x = _images(30)
    fake = types.ModuleType("tensorflow_datasets")
    fake.data_source = lambda name, download: {
        split: [{"image": x[i], "label": i % 10} for i in range(n)] for split, n in (("train", 30), ("test", 12))}
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    ds = load_dataset(DataConfig(source="auto", arch_val_size=10), seed=0)
    assert ds.source == "tfds" and len(ds.train.labels) == 20 and len(ds.test.labels) == 12
    assert np.array_equal(np.sort(np.concatenate([ds.train.labels, ds.arch_val.labels])), np.sort(np.arange(30) % 10))

    def not_prepared(name, download):
        raise FileNotFoundError("no array_record\nfiles")

    fake.data_source = not_prepared
    with pytest.raises(DataError, match="tfds cifar10 is not available") as exc:
        load_dataset(DataConfig(source="tfds", arch_val_size=10), seed=0)
    assert "\n" not in str(exc.value)


def test_download_success_then_cache(clean_env, fake_tarball, monkeypatch):
    tar_path, md5, (x_train, _, x_test, _) = fake_tarball
    monkeypatch.setattr(data, "CIFAR10_URL", tar_path.as_uri())
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    ds = load_dataset(DataConfig(source="download", arch_val_size=10, verify=False), seed=0)
    target = clean_env / "cifar-10-batches-py"
    assert ds.source == f"download:{target}"
    assert len(ds.train.labels) == 90 and len(ds.arch_val.labels) == 10
    np.testing.assert_array_equal(ds.test.images, x_test)
    assert sorted(p.name for p in clean_env.iterdir()) == ["cifar-10-batches-py"]  # no .part, tarball, tmp
    monkeypatch.setattr(data, "CIFAR10_URL", "http://127.0.0.1:1/unused")  # auto must use the cache now
    ds2 = load_dataset(DataConfig(source="auto", arch_val_size=10, verify=False), seed=0)
    assert ds2.source == f"dir:{target}"
    np.testing.assert_array_equal(ds2.train.images, ds.train.images)


def test_download_md5_mismatch(clean_env, fake_tarball, monkeypatch):
    tar_path, md5, _ = fake_tarball
    monkeypatch.setattr(data, "CIFAR10_URL", tar_path.as_uri())
    monkeypatch.setattr(data, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(DataError, match="md5 mismatch") as exc:
        load_dataset(DataConfig(source="download", arch_val_size=10), seed=0)
    assert "0" * 32 in str(exc.value) and md5 in str(exc.value)
    assert list(clean_env.iterdir()) == []  # partial file deleted, nothing extracted


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/cifar-10-python.tar.gz", "file:///nonexistent/c10.tar.gz"])
def test_download_unreachable(clean_env, monkeypatch, url):
    monkeypatch.setattr(data, "CIFAR10_URL", url.format(port=_free_port()))
    t0 = time.monotonic()
    with pytest.raises(DataError, match="cannot download CIFAR-10 .*ASOSE_DATA_DIR") as exc:
        load_dataset(DataConfig(source="auto", arch_val_size=10), seed=0)
    assert time.monotonic() - t0 < 5
    assert "\n" not in str(exc.value)
    assert not any(p.name.endswith(".part") for p in clean_env.iterdir())


# ---------------------------------------------------------------------------------------------- real data

@pytest.mark.realdata
def test_real_cifar10(cifar10_dir, monkeypatch):
    train, test = load_cifar10_dir(cifar10_dir.parent)
    assert train.images.shape == (50000, 32, 32, 3) and test.images.shape == (10000, 32, 32, 3)
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.array_equal(np.bincount(train.labels), np.full(10, 5000))
    mean = train.images.reshape(-1, 3).mean(axis=0, dtype=np.float64)
    np.testing.assert_allclose(mean, [125.307, 122.950, 113.865], atol=0.01)
    monkeypatch.setenv("ASOSE_DATA_DIR", str(cifar10_dir))
    ds = load_dataset(DataConfig(source="dir", arch_val_size=5000, test_subset=1000), seed=0)
    assert (len(ds.train.labels), len(ds.arch_val.labels), len(ds.test.labels)) == (45000, 5000, 1000)
