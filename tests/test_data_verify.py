"""Tests for the md5 check of a ``cifar-10-batches-py`` directory and its once-per-directory stamp."""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest

from asose_jax import data
from asose_jax.config import Config, DataConfig, apply_overrides
from asose_jax.data import CIFAR10_FILE_MD5, VERIFIED_STAMP, DataError, load_cifar10_dir, load_dataset

PER_BATCH = 20
AN_HOUR_AGO_NS = 3600 * 10**9


def _restored_like(root, seed=0):
    """Write root/cifar-10-batches-py as a restore would (files an hour old); return the batches dir and
    an md5 table that accepts exactly these files."""
    rng = np.random.default_rng(seed)
    out = root / "cifar-10-batches-py"
    out.mkdir(parents=True)
    table = {}
    for name in CIFAR10_FILE_MD5:
        planar = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        blob = pickle.dumps({b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, PER_BATCH)],
                             b"data": planar}, protocol=4)  # raw pixel bytes
        (out / name).write_bytes(blob)
        mtime = (out / name).stat().st_mtime_ns - AN_HOUR_AGO_NS
        os.utime(out / name, ns=(mtime, mtime))
        table[name] = ("0" * 32, hashlib.md5(blob).hexdigest())  # (release, pack): only the second matches
    return out, table


def _flip_one_pixel_byte(file):
    """Change one byte in the middle, inside the raw pixel bytes: same length, still a loadable batch."""
    blob = bytearray(file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    file.write_bytes(bytes(blob))


@pytest.fixture
def batches(tmp_path, monkeypatch):
    """A restored-like batches dir whose md5s are the known ones; the cache dir is private."""
    monkeypatch.setenv("ASOSE_CACHE_DIR", str(tmp_path / "cache"))
    out, table = _restored_like(tmp_path / "data")
    monkeypatch.setattr(data, "CIFAR10_FILE_MD5", table)
    return out


@pytest.fixture
def md5_calls(monkeypatch):
    """The names of the files hashed so far."""
    calls = []
    real = data._md5_file

    def counting(file):
        calls.append(file.name)
        return real(file)

    monkeypatch.setattr(data, "_md5_file", counting)
    return calls


def test_a_changed_byte_of_the_same_length_fails_in_one_line_that_names_the_file(batches):
    _flip_one_pixel_byte(batches / "data_batch_3")
    with pytest.raises(DataError) as exc:
        load_cifar10_dir(batches)
    message = str(exc.value)
    assert "data_batch_3" in message and "--set data.verify=false" in message
    assert "\n" not in message
    assert not (batches / VERIFIED_STAMP).exists()


def test_verify_false_loads_the_changed_directory(batches):
    _flip_one_pixel_byte(batches / "test_batch")
    cfg = DataConfig(source="dir", dir=str(batches), arch_val_size=10, verify=False)
    ds = load_dataset(cfg, seed=0)
    assert len(ds.test) == PER_BATCH and len(ds.train) + len(ds.arch_val) == 5 * PER_BATCH


def test_the_opt_out_parses_from_the_command_line_form():
    assert apply_overrides(Config(), ["data.verify=false"]).data.verify is False
    assert Config().data.verify is True


def test_the_stamp_makes_the_second_load_skip_hashing(batches, md5_calls):
    first = load_cifar10_dir(batches)
    assert sorted(md5_calls) == sorted(CIFAR10_FILE_MD5)
    stamp = json.loads((batches / VERIFIED_STAMP).read_text())
    assert {name: rec["md5"] for name, rec in stamp.items()} == {k: v[1] for k, v in data.CIFAR10_FILE_MD5.items()}
    md5_calls.clear()
    second = load_cifar10_dir(batches.parent)  # the parent resolves to the same directory and stamp
    assert md5_calls == []
    np.testing.assert_array_equal(first[0].images, second[0].images)


def test_a_file_changed_after_the_stamp_is_hashed_again_and_fails(batches, md5_calls):
    load_cifar10_dir(batches)
    _flip_one_pixel_byte(batches / "data_batch_5")  # a new mtime: the stamp no longer covers it
    md5_calls.clear()
    with pytest.raises(DataError, match="data_batch_5"):
        load_cifar10_dir(batches)
    assert "data_batch_5" in md5_calls


def test_a_file_as_new_as_the_stamp_is_not_trusted(batches, md5_calls):
    load_cifar10_dir(batches)
    stamp_mtime = (batches / VERIFIED_STAMP).stat().st_mtime_ns
    os.utime(batches / "data_batch_2", ns=(stamp_mtime, stamp_mtime))  # as if rewritten within the clock's tick
    recorded = json.loads((batches / VERIFIED_STAMP).read_text())
    recorded["data_batch_2"]["mtime_ns"] = stamp_mtime
    (batches / VERIFIED_STAMP).write_text(json.dumps(recorded))
    os.utime(batches / VERIFIED_STAMP, ns=(stamp_mtime, stamp_mtime))
    md5_calls.clear()
    load_cifar10_dir(batches)
    assert sorted(md5_calls) == sorted(CIFAR10_FILE_MD5)


def test_an_unwritable_data_dir_keeps_its_stamp_in_the_cache_dir(batches, md5_calls, tmp_path):
    (batches / VERIFIED_STAMP).mkdir()  # nothing can be written where the stamp would go (true even as root)
    load_cifar10_dir(batches)
    cached = list((tmp_path / "cache" / "verified").glob("*.json"))
    assert len(cached) == 1 and not list(batches.glob("*.tmp"))
    md5_calls.clear()
    load_cifar10_dir(batches)
    assert md5_calls == []


@pytest.mark.realdata
def test_the_restored_shared_pack_verifies_and_gets_a_stamp(cifar10_dir):
    load_cifar10_dir(cifar10_dir)
    stamp = json.loads((cifar10_dir / VERIFIED_STAMP).read_text())
    assert {name: rec["md5"] for name, rec in stamp.items()} == {k: v[1] for k, v in CIFAR10_FILE_MD5.items()}
