"""CIFAR-10 loading (pure numpy) and on-device augmentation (jax.numpy).

Loading gives host ``uint8`` NHWC images and ``int32`` labels in three splits:

* ``train``    -- what the weights fit;
* ``arch_val`` -- held out of the 50k training images for the architecture step and every decision
  (early stop, growth); never the test set;
* ``test``     -- reporting only.

Sources (``DataConfig.source``): a ``cifar-10-batches-py`` directory, ``tensorflow_datasets`` (if already
prepared), a download of the official tarball into ``~/.cache/asose_jax`` (``ASOSE_CACHE_DIR``), or a small
learnable synthetic set. Every failure raises :class:`DataError` with a one-line message.

Augmentation (:func:`augment_batch`) and :func:`normalize` are jittable and run on device: random crop with
4-pixel zero padding, horizontal flip, optional cutout, then per-channel normalisation with the original
ASO-SE constants :data:`CIFAR_MEAN` / :data:`CIFAR_STD` (0..255 scale).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from asose_jax.errors import DataError
from asose_jax.utils import one_line

if TYPE_CHECKING:
    from asose_jax.config import DataConfig

logger = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
# md5 of each file that load_cifar10_dir reads: as released in the official tarball (the table torchvision
# checks), and as written by the lossless CIFAR-10 pack's restore.py (the same pixels and labels; its
# ``filenames`` entries differ from the release's, so its bytes do too).
CIFAR10_FILE_MD5 = {
    "data_batch_1": ("c99cafc152244af753f735de768cd75f", "b3fa850a8ddb2005316c7e0811eca54b"),
    "data_batch_2": ("d4bba439e000b95fd0a9bffe97cbabec", "ab2fa8a55b5247bca0e629086dd97497"),
    "data_batch_3": ("54ebc095f3ab1f0389bbae665268c751", "80112731f2b431a29b99abb5690988e8"),
    "data_batch_4": ("634d18415352ddfa80567beed471001a", "7a89699075ed5a59e1d4e9073d716c40"),
    "data_batch_5": ("482c414d41f54cd18b22e5b47cb7c3cb", "36f21238ba5787f09d2bb0b682b41b0c"),
    "test_batch": ("40351d587109b95175f43aff81a1287e", "0cf7a2347d144b3aeb70dd087c537b52"),
}
VERIFIED_STAMP = ".asose_jax-verified.json"
DOWNLOAD_TIMEOUT_S = 10.0
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
CROP_PADDING = 4

CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32) * np.float32(255.0)
CIFAR_STD = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32) * np.float32(255.0)


@dataclasses.dataclass(frozen=True)
class Split:
    """Host arrays of one split."""

    images: np.ndarray  # uint8 [N, 32, 32, 3] NHWC
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: np.ndarray | slice) -> Split:
        """The examples at ``idx`` (an index array or a slice), as a new Split."""
        return Split(self.images[idx], self.labels[idx])


@dataclasses.dataclass(frozen=True)
class Dataset:
    train: Split  # weights-train split (what the weights fit)
    arch_val: Split  # held-out split for the architecture step and all decisions (never the test set)
    test: Split  # reporting only
    source: str  # "dir:/path", "tfds", "download:/path", "synthetic"
    num_classes: int = NUM_CLASSES


# ---------------------------------------------------------------------------------------------- sources

def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Resolve ``cfg.source``, load train/test, hold out ``arch_val`` and apply the subsets."""
    if cfg.source == "synthetic":
        if cfg.arch_val_size >= cfg.synthetic_train:
            raise DataError(f"data.arch_val_size={cfg.arch_val_size} must be smaller than "
                            f"data.synthetic_train={cfg.synthetic_train}")
        full_train, test = synthetic_cifar(cfg.synthetic_train, cfg.synthetic_test, seed)
        source = "synthetic"
    else:
        full_train, test, source = _load_real(cfg)
    train, arch_val = split_arch_val(full_train, cfg.arch_val_size, seed)
    if cfg.train_subset > 0:
        train = train.take(slice(0, cfg.train_subset))
    if cfg.test_subset > 0:
        test = test.take(slice(0, cfg.test_subset))
    logger.info("data %s: %d train, %d arch-val, %d test", source, len(train), len(arch_val), len(test))
    return Dataset(train=train, arch_val=arch_val, test=test, source=source)


def _load_real(cfg: DataConfig) -> tuple[Split, Split, str]:
    """(train 50k, test 10k, source string) for the non-synthetic sources."""
    env_dir = os.environ.get("ASOSE_DATA_DIR", "")
    if cfg.source in ("auto", "dir"):
        path = cfg.dir or env_dir
        if path:
            train, test = load_cifar10_dir(path, cfg.verify)
            return train, test, f"dir:{Path(path).expanduser().resolve()}"
        if cfg.source == "dir":
            raise DataError("data.source=dir needs a directory: pass --data-dir or set ASOSE_DATA_DIR")
    if cfg.source == "tfds":
        train, test = load_tfds()
        return train, test, "tfds"
    if cfg.source == "auto":
        try:
            train, test = load_tfds()
            return train, test, "tfds"
        except DataError as e:
            logger.debug("tfds not used: %s", e)
        cached = cache_dir() / CIFAR10_DIRNAME
        if cached.is_dir():
            train, test = load_cifar10_dir(cached, cfg.verify)
            return train, test, f"dir:{cached}"
    path = download_cifar10()
    train, test = load_cifar10_dir(path, cfg.verify)
    return train, test, f"download:{path}"


def cache_dir() -> Path:
    """``$ASOSE_CACHE_DIR`` or ``~/.cache/asose_jax``."""
    return Path(os.environ.get("ASOSE_CACHE_DIR") or Path.home() / ".cache" / "asose_jax").expanduser()


def load_tfds() -> tuple[Split, Split]:
    """(train, test) from an already prepared ``tensorflow_datasets`` cifar10 (never downloads)."""
    hint = ("prepare it with: python -c \"import tensorflow_datasets as tfds; "
            "tfds.builder('cifar10', file_format='array_record').download_and_prepare()\"")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("tensorflow_datasets is not installed (pip install 'asose_jax[tfds]'); "
                        + hint) from None
    try:
        sources = tfds.data_source("cifar10", download=False)
        splits = []
        for name in ("train", "test"):
            ds = sources[name]
            examples = [ds[i] for i in range(len(ds))]
            images = np.stack([np.asarray(ex["image"]) for ex in examples])
            labels = np.asarray([int(ex["label"]) for ex in examples])
            splits.append(_checked_split(images, labels, f"tfds cifar10/{name}"))
    except DataError:
        raise
    except Exception as e:  # tfds raises many types for "not prepared"; report any as one line
        raise DataError(f"tfds cifar10 is not available ({type(e).__name__}: {one_line(e)}); {hint}") from None
    return splits[0], splits[1]


# ---------------------------------------------------------------------------------------------- download

def download_cifar10() -> Path:
    """Download, md5-check and extract the official tarball into :func:`cache_dir`; return the batches dir."""
    root = cache_dir()
    target = root / CIFAR10_DIRNAME
    if target.is_dir():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create cache directory {root}: {one_line(e)}") from None
    archive = root / "cifar-10-python.tar.gz"
    _fetch(CIFAR10_URL, archive, CIFAR10_MD5)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot extract {archive}: {one_line(e)}") from None
        if not (tmp / CIFAR10_DIRNAME).is_dir():
            raise DataError(f"{archive} does not contain {CIFAR10_DIRNAME}/")
        if not target.is_dir():  # another process may have finished first
            os.replace(tmp / CIFAR10_DIRNAME, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    archive.unlink(missing_ok=True)
    logger.info("CIFAR-10 extracted to %s", target)
    return target


def _fetch(url: str, dest: Path, md5: str) -> None:
    """Stream ``url`` to ``dest.part`` with a progress bar, check md5, then rename to ``dest``."""
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5()
    logger.info("downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(part, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10", disable=None) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, refused connections, bad URLs
        part.unlink(missing_ok=True)
        raise DataError(f"cannot download CIFAR-10 ({type(e).__name__}: {one_line(e)}); "
                        "pass --data-dir or set ASOSE_DATA_DIR") from None
    got = digest.hexdigest()
    if got != md5:
        part.unlink(missing_ok=True)
        raise DataError(f"md5 mismatch for {url}: expected {md5}, got {got} (partial file deleted)")
    os.replace(part, dest)


# ---------------------------------------------------------------------------------------------- batches dir

def load_cifar10_dir(path: str | os.PathLike, verify: bool = True) -> tuple[Split, Split]:
    """(train 50k, test 10k) from a ``cifar-10-batches-py`` directory or a parent that contains it.

    ``verify``: check the files' md5 with :func:`verify_cifar10_dir` (after reading them, so a missing or
    unreadable file is reported as such).
    """
    root = Path(path).expanduser()
    if (root / CIFAR10_DIRNAME).is_dir():
        root = root / CIFAR10_DIRNAME
    if not root.is_dir():
        raise DataError(f"data directory not found: {path}")
    train_parts = [_read_batch(root / name) for name in CIFAR10_TRAIN_FILES]
    train = Split(np.concatenate([s.images for s in train_parts]), np.concatenate([s.labels for s in train_parts]))
    test = _read_batch(root / CIFAR10_TEST_FILE)
    if verify:
        verify_cifar10_dir(root)
    logger.debug("loaded CIFAR-10 from %s: %d train, %d test", root, len(train), len(test))
    return train, test


def verify_cifar10_dir(root: Path) -> None:
    """Check the md5 of each batch file in ``root`` against :data:`CIFAR10_FILE_MD5`, once per directory.

    A changed byte can leave a batch loadable, so only the bytes tell. After a check passes, a stamp records
    each file's size, mtime and md5, next to the data or, when that directory is read-only, under
    :func:`cache_dir`; a later call whose files still have the recorded size and mtime skips the hashing.
    Raises :class:`DataError` naming the first file whose md5 is not a known one.
    """
    signatures = {name: _file_signature(root / name) for name in CIFAR10_FILE_MD5}
    stamps = _stamp_paths(root)
    if any(_stamp_matches(p, signatures) for p in stamps):
        return
    for name, known in CIFAR10_FILE_MD5.items():
        got = _md5_file(root / name)
        if got not in known:
            raise DataError(f"CIFAR-10 file {root / name} has changed (md5 {got} is neither the release's nor "
                            "the lossless pack's): restore it, or pass --set data.verify=false to use it as it is")
        signatures[name]["md5"] = got
    logger.info("verified the md5 of the CIFAR-10 files in %s", root)
    _write_stamp(stamps, signatures)


def _file_signature(file: Path) -> dict:
    st = file.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _md5_file(file: Path) -> str:
    digest = hashlib.md5()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp_paths(root: Path) -> tuple[Path, Path]:
    """Where the verification stamp of ``root`` goes: next to the data, else in the cache (keyed by path)."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return root / VERIFIED_STAMP, cache_dir() / "verified" / f"{key}.json"


def _stamp_matches(stamp: Path, signatures: dict) -> bool:
    """True when ``stamp`` records these sizes and mtimes, each with an md5 that is still a known one.

    A file as new as the stamp itself is not trusted: it may have changed within one tick of the file
    system's clock after it was hashed, leaving its mtime as recorded.
    """
    try:
        stamp_mtime = stamp.stat().st_mtime_ns
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or recorded.keys() != signatures.keys():
        return False
    return all(isinstance(rec, dict) and rec.get("md5") in CIFAR10_FILE_MD5[name]
               and {k: rec.get(k) for k in ("size", "mtime_ns")} == signatures[name]
               and signatures[name]["mtime_ns"] < stamp_mtime
               for name, rec in recorded.items())


def _write_stamp(stamps: tuple[Path, ...], signatures: dict) -> None:
    """Write the stamp at the first of ``stamps`` that can be written (atomically); none is only logged."""
    text = json.dumps(signatures, indent=1, sort_keys=True) + "\n"
    for stamp in stamps:
        tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, stamp)
            return
        except OSError as e:
            logger.debug("verification stamp not written at %s: %s", stamp, one_line(e))
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    logger.info("no verification stamp could be written, so the next run checks the md5s again")


def _read_batch(file: Path) -> Split:
    """One pickled batch: ``b'data'`` N x 3072 (R, G, B planes, row-major) -> NHWC uint8."""
    if not file.is_file():
        raise DataError(f"missing CIFAR-10 batch file: {file}")
    try:
        with open(file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"])
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError, TypeError, IndexError,
            AttributeError, ImportError) as e:
        raise DataError(f"corrupted CIFAR-10 batch file {file} ({type(e).__name__}: {one_line(e)})") from None
    h, w, c = IMAGE_SHAPE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != h * w * c:
        raise DataError(f"bad CIFAR-10 batch file {file}: data is {data.dtype} {data.shape}, "
                        f"expected uint8 (N, {h * w * c})")
    images = data.reshape(-1, c, h, w).transpose(0, 2, 3, 1)
    return _checked_split(images, labels, f"CIFAR-10 batch file {file}")


def _checked_split(images: np.ndarray, labels: np.ndarray, what: str) -> Split:
    """Validate shapes/range and return a contiguous uint8/int32 Split; DataError names ``what``."""
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"bad {what}: images have shape {images.shape}, expected (N, 32, 32, 3)")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"bad {what}: {labels.shape} labels for {images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"bad {what}: labels span {labels.min()}..{labels.max()}, expected 0..{NUM_CLASSES - 1}")
    return Split(np.ascontiguousarray(images, dtype=np.uint8), labels.astype(np.int32))


# ---------------------------------------------------------------------------------------------- synthetic

def synthetic_cifar(n_train: int, n_test: int, seed: int, num_classes: int = NUM_CLASSES) -> tuple[Split, Split]:
    """A small learnable CIFAR-shaped set: per-class colour + low-frequency pattern templates plus noise.

    Returns (train, test) Splits of ``n_train`` / ``n_test`` uint8 [N, 32, 32, 3] images with balanced
    int32 labels; deterministic given ``seed``. Train and test share the templates, not the noise.
    """
    rng = np.random.default_rng(seed)
    h, w, c = IMAGE_SHAPE
    yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    colour = rng.uniform(50.0, 205.0, size=(num_classes, 1, 1, c))
    freq = rng.integers(1, 4, size=(num_classes, 2, c))  # cycles per image along y / x
    phase = rng.uniform(0.0, 2 * np.pi, size=(num_classes, c))
    pattern = np.sin(2 * np.pi * (freq[:, None, None, 0] * yy[None, :, :, None]
                                  + freq[:, None, None, 1] * xx[None, :, :, None]) + phase[:, None, None, :])
    templates = colour + 45.0 * pattern  # [classes, H, W, C]

    def draw(n: int) -> Split:
        labels = rng.permutation(np.arange(n) % num_classes)
        gain = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1))
        noise = rng.normal(0.0, 25.0, size=(n, h, w, c))
        images = np.clip(np.rint(templates[labels] * gain + noise), 0, 255).astype(np.uint8)
        return Split(images, labels.astype(np.int32))

    return draw(n_train), draw(n_test)


# ---------------------------------------------------------------------------------------------- splits

def split_arch_val(train: Split, arch_val_size: int, seed: int) -> tuple[Split, Split]:
    """(weights split, arch_val split): a seeded permutation; its last ``arch_val_size`` go to arch_val."""
    n = len(train)
    if not 0 < arch_val_size < n:
        raise DataError(f"data.arch_val_size={arch_val_size} must be in 1..{n - 1} (the training set has {n} images)")
    perm = np.random.default_rng(seed).permutation(n)
    return train.take(perm[:-arch_val_size]), train.take(perm[-arch_val_size:])


def epoch_permutation(seed: int, epoch_id: int, n: int, batch_size: int) -> np.ndarray:
    """int32 [n // batch_size, batch_size] example indices of one epoch (drop_last), seeded by (seed, epoch_id)."""
    if batch_size < 1 or n < batch_size:
        raise DataError(f"batch size {batch_size} needs at least that many examples, the split has {n}")
    steps = n // batch_size
    perm = np.random.default_rng((seed, epoch_id)).permutation(n)[: steps * batch_size]
    return perm.reshape(steps, batch_size).astype(np.int32)


# ---------------------------------------------------------------------------------------------- on device

def normalize(images_u8: jnp.ndarray) -> jnp.ndarray:
    """uint8 [..., 3] -> float32 ``(x - CIFAR_MEAN) / CIFAR_STD``; jittable."""
    return (jnp.asarray(images_u8, jnp.float32) - CIFAR_MEAN) / CIFAR_STD


def augment_batch(key: jax.Array, images_u8: jnp.ndarray, crop: bool, flip: bool, cutout: int = 0) -> jnp.ndarray:
    """uint8 [B, H, W, C] -> float32 normalised [B, H, W, C], per-example random augmentation.

    ``crop``: pad 4 zero pixels on each side, then a random HxW window; ``flip``: horizontal flip with
    p=0.5; ``cutout`` > 0: zero a ``cutout`` x ``cutout`` square (after normalisation) centred uniformly
    in the image, clipped at the borders. ``crop``/``flip``/``cutout`` are static; deterministic in ``key``.
    """
    x = jnp.asarray(images_u8)
    b, h, w, c = x.shape
    k_crop, k_flip, k_cut = jax.random.split(key, 3)
    if crop:
        p = CROP_PADDING
        padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * p + 1)
        x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    if flip:
        flipped = jax.random.bernoulli(k_flip, 0.5, (b,))
        x = jnp.where(flipped[:, None, None, None], x[:, :, ::-1, :], x)
    out = normalize(x)
    if cutout > 0:
        centre = jax.random.randint(k_cut, (b, 2), 0, jnp.array([h, w]))
        lo = centre - cutout // 2  # [B, 2]; rows/cols lo .. lo + cutout - 1, clipped by the image
        rows = (jnp.arange(h)[None, :] >= lo[:, :1]) & (jnp.arange(h)[None, :] < lo[:, :1] + cutout)
        cols = (jnp.arange(w)[None, :] >= lo[:, 1:]) & (jnp.arange(w)[None, :] < lo[:, 1:] + cutout)
        hole = rows[:, :, None] & cols[:, None, :]  # [B, H, W]
        out = jnp.where(hole[..., None], 0.0, out)
    return out
