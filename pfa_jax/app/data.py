"""Image-classification datasets as in-memory numpy arrays, without TensorFlow.

`load(name)` returns a `Dataset` of float32 NHWC images and int32 labels for one of `DATASETS`:

- ``fashion_mnist`` is read from the four IDX files (gzip or plain) of a local directory: `data_dir` if
  given, else ``$PFA_JAX_FASHION_MNIST_DIR`` if set, else `DEFAULT_FASHION_MNIST_DIR` if it exists
  (Debian: ``apt-get install -y dataset-fashion-mnist``). Only when none of these applies does it come
  through tensorflow-datasets like the others.
- ``mnist`` and ``cifar10`` come through ``tfds.data_source`` (array_record files, read without
  TensorFlow), from `data_dir` or tfds's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
  tfds downloads and prepares them on first use where it can; preparing needs TensorFlow and internet
  (``tfds build NAME --file_format=array_record``), reading afterwards needs neither.
- ``imagenet2012`` (in `STREAMED_DATASETS`) does not fit in memory: ``pfa_jax.app.streaming.load`` reads it
  batch by batch; `load` refuses it.

Processing, in this order:

1. ``holdout=k`` moves the last ``k`` examples of the official training set (in stored order; tfds
   stores records in a fixed shuffled order) into a validation set, which is returned as the ``test_*``
   arrays in place of the official test set (the papers' 45k/5k CIFAR-10 split is ``holdout=5000``).
   ``holdout=0`` keeps the official test set.
2. ``limit=n`` keeps the first ``n`` examples of each split (for tests and smoke runs); with tfds only
   those records are read.
3. Pixels are scaled to [0, 1], then standardised per channel with the mean and std of the training
   split (after holdout and limit); the test split uses the same statistics. Grayscale images get a
   channel axis: (N, 28, 28, 1).
4. ``pad_to=s`` zero-pads the normalised images spatially to ``s x s``, centred (0 is the channel mean),
   e.g. ``pad_to=32`` to run CIFAR ResNets on 28x28 images.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "DATASETS", "DEFAULT_FASHION_MNIST_DIR", "fashion_mnist_dir", "load",
           "load_idx_dir", "NUM_CLASSES", "read_idx", "STREAMED_DATASETS"]

STREAMED_DATASETS = ("imagenet2012",)  # read by pfa_jax.app.streaming, not by `load`
DATASETS = ("fashion_mnist", "mnist", "cifar10") + STREAMED_DATASETS
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_DIR_ENV = "PFA_JAX_FASHION_MNIST_DIR"
NUM_CLASSES = 10  # every dataset that `load` reads

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type codes (third byte of the magic number); multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
_HOW_TO_GET_FASHION_MNIST = (
    f"install it with `apt-get install -y dataset-fashion-mnist` (IDX files in {DEFAULT_FASHION_MNIST_DIR}), "
    "download the IDX files from https://github.com/zalandoresearch/fashion-mnist into a directory and pass "
    f"it as data_dir or ${_FASHION_MNIST_DIR_ENV}, or prepare it with "
    "`tfds build fashion_mnist --file_format=array_record`"
)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Normalised train and test (or validation, see `load`'s ``holdout``) splits of one dataset."""

    name: str
    train_images: np.ndarray  # (N, H, W, C) float32
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray  # (M, H, W, C) float32, normalised with the train statistics
    test_labels: np.ndarray  # (M,) int32
    num_classes: int
    mean: tuple[float, ...]  # per channel, of the [0, 1]-scaled training images
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


def read_idx(path) -> np.ndarray:
    """Reads one IDX file (gzip-compressed or plain, detected from its content) into a numpy array."""
    raw = Path(path).read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(
            f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}; expected 0000TTDD "
            f"with type TT in {{{', '.join(f'{t:02x}' for t in _IDX_DTYPES)}}} and DD >= 1 dimensions)"
        )
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: {len(raw) - header} data bytes, but the header's shape {shape} of {dtype.name} "
            f"needs {expected} (truncated or corrupt file)"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx_dir(directory) -> dict[str, np.ndarray]:
    """Reads the MNIST-layout IDX files of `directory` (each ``NAME`` or ``NAME.gz``).

    Returns a dict with ``train_images`` and ``test_images`` as stored (uint8, (N, H, W)) and
    ``train_labels`` and ``test_labels`` ((N,)).
    """
    arrays = {}
    for key, filename in _IDX_FILES.items():
        candidates = [Path(directory) / filename, Path(directory) / f"{filename}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"missing IDX file {candidates[0]} (or {candidates[1].name}); to get Fashion-MNIST, "
                + _HOW_TO_GET_FASHION_MNIST
            )
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{directory}: {split} images ({images.dtype}, shape {images.shape}) and labels (shape "
                f"{labels.shape}) do not fit together; expected uint8 (N, H, W) images and (N,) labels"
            )
    return arrays


def load(
    name: str,
    *,
    data_dir: str | None = None,
    holdout: int = 0,
    pad_to: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """Loads dataset `name` (one of `DATASETS`); see the module docstring for sources and processing."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if name in STREAMED_DATASETS:
        raise ValueError(f"{name} does not fit in memory: read it batch by batch with "
                         "pfa_jax.app.streaming.load (pfa_jax.app.experiment does)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples, got {limit!r}")

    idx_dir = fashion_mnist_dir(data_dir) if name == "fashion_mnist" else None
    if idx_dir is not None:
        arrays = load_idx_dir(idx_dir)
        train = (arrays["train_images"][..., None], arrays["train_labels"])
        test = (arrays["test_images"][..., None], arrays["test_labels"])
        sizes, read = (len(train[1]), len(test[1])), _read_arrays
    else:
        train, test = tfds_sources(name, data_dir)
        sizes, read = (len(train), len(test)), _read_tfds

    num_train = sizes[0]
    if not 0 <= holdout < num_train:
        raise ValueError(
            f"holdout must be in [0, {num_train}) for {name}'s {num_train} training examples, got {holdout!r}"
        )
    train_rows = range(num_train - holdout)
    test, test_rows = (train, range(num_train - holdout, num_train)) if holdout else (test, range(sizes[1]))
    train_images, train_labels = read(train, train_rows[:limit])
    test_images, test_labels = read(test, test_rows[:limit])
    for labels in (train_labels, test_labels):
        if not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
            raise ValueError(f"{name}: labels outside [0, {NUM_CLASSES}): {np.unique(labels)}")

    mean, std = _channel_stats(train_images)
    if not np.all(std > 0):
        raise ValueError(f"{name}: a training-image channel is constant (std {std}); cannot normalise")
    train_images, test_images = (_normalise(x, mean, std, pad_to) for x in (train_images, test_images))
    return Dataset(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=NUM_CLASSES,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def fashion_mnist_dir(data_dir: str | None = None) -> str | None:
    """The local IDX directory Fashion-MNIST is read from, or None: it comes through
    tensorflow-datasets."""
    if data_dir is not None:
        return data_dir
    if os.environ.get(_FASHION_MNIST_DIR_ENV):
        return os.environ[_FASHION_MNIST_DIR_ENV]
    return DEFAULT_FASHION_MNIST_DIR if os.path.isdir(DEFAULT_FASHION_MNIST_DIR) else None


def tfds_sources(name, data_dir):
    """The train and test `tfds.data_source`s of `name`, or a FileNotFoundError saying how to get them."""
    import tensorflow_datasets as tfds  # Imported here: slow to import, and the IDX path does not need it.

    how = (
        _HOW_TO_GET_FASHION_MNIST
        if name == "fashion_mnist"
        else f"prepare it with `tfds build {name} --file_format=array_record` (needs internet and "
        "TensorFlow; reading it afterwards needs neither) and pass its directory as data_dir "
        "or $TFDS_DATA_DIR"
    )
    offline = None if _prepared(tfds, name, data_dir) else offline_reason()
    if offline:  # fail now rather than after minutes of download retries
        raise FileNotFoundError(
            f"{name!r} is not prepared in data_dir={data_dir!r} (tfds's default: $TFDS_DATA_DIR or "
            f"~/tensorflow_datasets) and cannot be downloaded: no network ({offline}).\nTo get it, "
            f"{how}."
        )
    try:
        return tfds.data_source(name, split=["train", "test"], data_dir=data_dir)
    except Exception as e:  # tfds fails in many ways (no network, no TensorFlow, ...); the cause is chained.
        raise FileNotFoundError(
            f"could not load {name!r} through tensorflow-datasets (data_dir={data_dir!r}): "
            f"{type(e).__name__}: {e}\nTo get it, {how}."
        ) from e


def _prepared(tfds, name: str, data_dir) -> bool:
    """Whether tfds holds ``name`` prepared in ``data_dir`` (True where that cannot be told: tfds
    then reports for itself)."""
    try:
        return tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # noqa: BLE001 - an unknown name, a broken directory: data_source says which
        return True


def offline_reason(host: str = "storage.googleapis.com", timeout: float = 5.0) -> str | None:
    """Why downloads cannot work, or None: a TCP connection to ``host`` (where tfds and most
    datasets download from) within ``timeout`` seconds."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        return f"cannot reach {host}: {error.strerror or error}"
    return None


def _read_arrays(split, rows):
    images, labels = split
    return images[rows.start : rows.stop], labels[rows.start : rows.stop].astype(np.int32)


def _read_tfds(source, rows):
    records = source.__getitems__(rows)  # One batched read; decoding is per record inside tfds.
    images = np.stack([r["image"] for r in records])
    return images, np.array([r["label"] for r in records], dtype=np.int32)


def _channel_stats(images):
    """Exact per-channel mean and std of uint8 images scaled to [0, 1], from 256-bin histograms."""
    levels = np.arange(256) / 255.0
    mean, std = [], []
    for c in range(images.shape[-1]):
        p = np.bincount(images[..., c].ravel(), minlength=256) / images[..., c].size
        m = p @ levels
        mean.append(m)
        std.append(np.sqrt(p @ (levels - m) ** 2))
    return np.array(mean), np.array(std)


def _normalise(images, mean, std, pad_to):
    x = images.astype(np.float32, order="C")
    x *= (1 / (255 * std)).astype(np.float32)
    x -= (mean / std).astype(np.float32)
    if pad_to is None:
        return x
    height, width = x.shape[1:3]
    if pad_to < max(height, width):
        raise ValueError(f"pad_to={pad_to!r} is smaller than the {height}x{width} images")
    top, left = (pad_to - height) // 2, (pad_to - width) // 2
    return np.pad(x, ((0, 0), (top, pad_to - height - top), (left, pad_to - width - left), (0, 0)))
