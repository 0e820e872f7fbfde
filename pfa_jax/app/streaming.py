"""Datasets too large for memory (ImageNet), read batch by batch from tfds array_record files, without
TensorFlow.

    dataset = pfa_jax.app.streaming.load("imagenet2012", data_dir="~/tensorflow_datasets")
    for batch in dataset.train_batches(256, seed=0, epoch=3):   # {'image': (256, 224, 224, 3), 'label'}
        ...
    for batch in dataset.eval_batches(500):                      # the validation split, with 'mask'
        ...

Source: ``imagenet2012`` through ``tfds.builder(...).as_data_source`` from `data_dir` or tfds's
default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). It must have been prepared once as
array_record (`HOW_TO_PREPARE`; preparing needs TensorFlow, reading needs neither). The input
pipeline is a grain ``MapDataset`` over an epoch's batches: each batch's records are read, decoded
with tfds's numpy decoding (``features.deserialize_example_np``: OpenCV if installed, else PIL),
preprocessed and standardised by one worker: one of `workers` threads of this process, or with
``processes=N`` one of N grain worker processes (``mp_prefetch``, for hosts where decoding in one
Python process cannot keep up), `prefetch` batches ahead of the consumer.

Splits: ``train`` for training; the official ``validation`` split (50,000 images) is the test set
(ImageNet's test split has no labels). ``limit=n`` keeps the first ``n`` records of each split (in
stored order: tfds stores records in a fixed shuffled order), as ``pfa_jax.app.data.load`` does.
``holdout`` (a validation set cut from the training split) and ``pad_to`` are not supported and
raise. 1000 classes.

Preprocessing (the standard ResNet recipe, as torchvision's ImageNet reference; PIL bilinear
resampling, which antialiases when it shrinks):

* training: a random-resized crop (`crop_box`: area fraction uniform in ``CROP_SCALE = (0.08, 1)`` of
  the image, aspect ratio log-uniform in ``CROP_RATIO = (3/4, 4/3)``, 10 tries, else the central crop
  of the nearest allowed aspect ratio) resized to ``image_size x image_size``, then a horizontal flip
  with probability 1/2;
* evaluation: the shorter side resized to ``round(image_size * 256 / 224)`` (256 for 224; the longer
  side ``int(256 * long / short)``), then the central ``image_size x image_size`` crop;
* both: pixels scaled to [0, 1] and standardised per channel with the ImageNet statistics `MEAN`
  ``(0.485, 0.456, 0.406)`` and `STD` ``(0.229, 0.224, 0.225)`` (RGB); float32 NHWC.

Determinism: epoch ``e`` of seed ``s`` visits the training records in the order of
``numpy.random.default_rng([s, e, 0]).permutation`` (dropping the last partial batch) and crops and
flips record ``i`` with ``default_rng([s, e, 1, i])``, so batch ``b`` of an epoch depends on
``(seed, epoch, b)`` only, not on threads, processes or timing. Evaluation is deterministic. So the
iterator's whole state is ``(epoch, next batch)``: ``train_batches(..., start=b)`` continues an
epoch at batch ``b`` with the batches an uninterrupted iterator would give (what a run resumed
mid-epoch does, ``pfa_jax.app.experiment``), for any thread, process, device or host count;
grain's own ``get_state`` would tie a saved state to the worker count.

``image_size`` (default 224) scales both recipes, e.g. to test on small images.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from absl import flags
from PIL import Image

from pfa_jax.app import data

__all__ = ["crop_box", "CROP_RATIO", "CROP_SCALE", "DATASETS", "eval_crop", "HOW_TO_PREPARE",
           "IMAGE_SIZE", "load", "MEAN", "NUM_CLASSES", "RESIZE_RATIO", "STD", "StreamedDataset",
           "TEST_SPLIT", "train_crop", "TRAIN_SPLIT"]

DATASETS = data.STREAMED_DATASETS
NUM_CLASSES = 1000
IMAGE_SIZE = 224
RESIZE_RATIO = 256 / 224  # evaluation: shorter side to round(image_size * RESIZE_RATIO), then crop
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
MEAN = (0.485, 0.456, 0.406)  # per RGB channel, of pixels in [0, 1]
STD = (0.229, 0.224, 0.225)
TRAIN_SPLIT, TEST_SPLIT = "train", "validation"
HOW_TO_PREPARE = (
    "ImageNet needs a manual download: register at https://image-net.org/download-images, download "
    "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into a directory MANUAL_DIR, then prepare it "
    "once with `tfds build imagenet2012 --manual_dir MANUAL_DIR --file_format=array_record "
    "--data_dir DATA_DIR` (preparing needs TensorFlow; reading afterwards does not) and pass "
    "DATA_DIR as data_dir or $TFDS_DATA_DIR"
)


def crop_box(rng: np.random.Generator, height: int, width: int, scale=CROP_SCALE, ratio=CROP_RATIO,
             attempts: int = 10) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` of a random-resized crop (torchvision's
    ``RandomResizedCrop.get_params``): the first of ``attempts`` draws of area fraction
    ``U(scale)`` and log-uniform aspect ratio (width / height) in ``ratio`` that fits, at a uniform
    position; else the central crop whose aspect ratio is the image's clipped to ``ratio``."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_crop(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    """The training crop of a uint8 ``(H, W, 3)`` image: random-resized crop to ``size x size``,
    then a horizontal flip with probability 1/2 (uint8)."""
    top, left, h, w = crop_box(rng, *image.shape[:2])
    crop = np.asarray(Image.fromarray(image).resize(
        (size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def eval_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The evaluation crop of a uint8 ``(H, W, 3)`` image: shorter side resized to
    ``round(size * RESIZE_RATIO)``, then the central ``size x size`` crop (uint8)."""
    height, width = image.shape[:2]
    short = round(size * RESIZE_RATIO)
    if height <= width:
        new_height, new_width = short, int(short * width / height)
    else:
        new_height, new_width = int(short * height / width), short
    resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.BILINEAR))
    top, left = int(round((new_height - size) / 2)), int(round((new_width - size) / 2))
    return resized[top:top + size, left:left + size]


def _seed(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([e % 2**64 for e in entropy])


@dataclasses.dataclass(frozen=True)
class StreamedDataset:
    """A dataset read from tfds array_record files batch by batch (see the module docstring)."""

    name: str
    features: Any  # the tfds FeaturesDict, for deserialize_example_np
    train_source: Any  # tfds data sources returning raw records
    test_source: Any
    num_train: int  # after `limit`
    num_test: int
    image_size: int = IMAGE_SIZE
    workers: int = 8
    processes: int = 0
    prefetch: int = 2
    num_classes: int = NUM_CLASSES
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def train_batches(self, batch_size: int, seed: int, epoch: int, rows: slice = slice(None),
                      start: int = 0) -> grain.DatasetIterator:
        """Epoch ``epoch``'s shuffled, augmented training batches ``{'image', 'label'}`` (the last
        partial batch is dropped) from batch ``start`` on (a run resumed mid-epoch); ``rows``:
        only these rows of each batch (one process's part of a global batch: it reads and decodes
        only those records)."""
        steps = self.num_train // batch_size
        order = _seed(seed, epoch, 0).permutation(self.num_train)[:steps * batch_size]
        plan = order.reshape(steps, batch_size)[start:, rows]
        prepare = functools.partial(_train_prepare, seed, epoch, self.image_size)
        return self._stream(self.train_source, plan, prepare, False)

    def eval_batches(self, batch_size: int, split: str = "test", count: int | None = None,
                     rows: slice = slice(None)) -> grain.DatasetIterator:
        """The first ``count`` (default all) examples of ``split`` (``'test'``: the validation split,
        or ``'train'``) in stored order, centre-cropped, as batches ``{'image', 'label', 'mask'}``
        of ``batch_size`` (the last one zero-padded, its padding masked out); ``rows``: only
        these rows of each batch, as in ``train_batches``."""
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} is unknown; valid: 'train', 'test'")
        source, size = ((self.test_source, self.num_test) if split == "test"
                        else (self.train_source, self.num_train))
        indices = np.arange(size if count is None else min(count, size))
        plan = [indices[i:i + batch_size][rows] for i in range(0, len(indices), batch_size)]
        return self._stream(source, plan, functools.partial(_eval_prepare, self.image_size), True,
                            len(range(batch_size)[rows]))

    def arrays(self, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``count`` examples of ``split`` (``'train'`` or ``'test'``), centre-cropped, as
        in-memory ``(images, labels)``."""
        images = [np.zeros((0,) + self.image_shape, np.float32)]
        labels = [np.zeros(0, np.int32)]
        for batch in self.eval_batches(max(1, min(count, 256)), split, count):
            n = int(batch["mask"].sum())
            images.append(batch["image"][:n])
            labels.append(batch["label"][:n])
        return np.concatenate(images), np.concatenate(labels)

    def subset(self, train_count: int, test_count: int) -> data.Dataset:
        """An in-memory ``pfa_jax.app.data.Dataset`` of the first ``train_count`` training and
        ``test_count`` validation examples, centre-cropped (for measurements on a fixed subset)."""
        return data.Dataset(self.name, *self.arrays("train", train_count),
                            *self.arrays("test", test_count), self.num_classes, self.mean, self.std)

    def _stream(self, source, plan, prepare: Callable, masked: bool, batch_size: int | None = None
                ) -> grain.DatasetIterator:
        """A grain iterator with one batch per index array of ``plan``: each batch read, decoded
        and preprocessed (``prepare(uint8 image, record index)``) by one of ``workers`` threads
        in each of ``processes`` worker processes (0: this process), ``prefetch`` batches ahead."""
        batches = grain.MapDataset.range(len(plan)).map(
            functools.partial(_read_batch, self, source, plan, prepare, masked, batch_size))
        threads = self.workers if not self.processes else 1
        stream = batches.to_iter_dataset(grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=max(threads, self.prefetch)))
        if self.processes:
            _absl_flags_parsed()
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.processes, per_worker_buffer_size=max(1, self.prefetch)))
        return iter(stream)


def _train_prepare(seed: int, epoch: int, size: int, image: np.ndarray, index: int) -> np.ndarray:
    return train_crop(_seed(seed, epoch, 1, index), image, size)


def _eval_prepare(size: int, image: np.ndarray, index: int) -> np.ndarray:
    del index
    return eval_crop(image, size)


def _read_batch(dataset: StreamedDataset, source, plan, prepare: Callable, masked: bool,
                batch_size: int | None, number: int) -> dict:
    """Batch ``number`` of ``plan``: its records read, decoded, checked, preprocessed and
    standardised (``{'image', 'label'}``, with ``'mask'`` and zero padding to ``batch_size`` when
    ``masked``)."""
    indices = plan[number]
    size = batch_size or len(indices)
    images = np.zeros((size,) + dataset.image_shape, np.float32)
    labels = np.zeros(size, np.int32)
    mean, std = np.asarray(dataset.mean), np.asarray(dataset.std)
    records = source.__getitems__([int(i) for i in indices])
    for slot, (record, index) in enumerate(zip(records, indices)):
        example = dataset.features.deserialize_example_np(record)
        image, label = example["image"], int(example["label"])
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{dataset.name} record {index}: image of shape {image.shape}, "
                             "expected (H, W, 3)")
        if not 0 <= label < dataset.num_classes:
            raise ValueError(f"{dataset.name} record {index}: label {label} outside "
                             f"[0, {dataset.num_classes})")
        images[slot] = data._normalise(prepare(image, int(index))[None], mean, std, None)[0]
        labels[slot] = label
    batch = {"image": images, "label": labels}
    if masked:
        batch["mask"] = (np.arange(size) < len(indices)).astype(np.float32)
    return batch


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags (their defaults, unless a program parsed
    them); a program that does not use absl has not parsed them, so they are marked parsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def load(name: str, *, data_dir: str | None = None, holdout: int = 0, pad_to: int | None = None,
         limit: int | None = None, image_size: int = IMAGE_SIZE, workers: int | None = None,
         processes: int = 0, prefetch: int = 2) -> StreamedDataset:
    """Opens dataset ``name`` (one of `DATASETS`) for streaming; see the module docstring.

    ``processes``: grain worker processes preparing batches (0: none, the batches are prepared in
    this process); ``workers``: the threads preparing them in this process when ``processes`` is
    0 (None or 0: ``min(32, os.cpu_count())``); ``prefetch``: batches prepared ahead of the one
    being consumed. Raises ``FileNotFoundError`` saying how to prepare the data if it is
    not there.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown streamed dataset {name!r}; valid: {', '.join(DATASETS)}")
    if holdout:
        raise ValueError(f"holdout={holdout!r} is not supported for {name}: its test set is the "
                         "official validation split; use holdout=0")
    if pad_to:
        raise ValueError(f"pad_to={pad_to!r} is not supported for {name}: its images are cropped "
                         f"to image_size x image_size (image_size={image_size!r}); use pad_to=0")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples, got {limit!r}")
    for key, value, low in (("image_size", image_size, 1), ("workers", workers or 1, 1),
                            ("processes", processes, 0), ("prefetch", prefetch, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key}={value!r} must be an int >= {low}")
    features, train, test = _sources(name, data_dir)
    return StreamedDataset(name, features, train, test, min(len(train), limit or len(train)),
                           min(len(test), limit or len(test)), image_size,
                           workers or min(32, os.cpu_count() or 1), processes, prefetch)


def _sources(name: str, data_dir: str | None):
    """The features and the raw-record train and validation sources of a prepared tfds dataset."""
    import tensorflow_datasets as tfds  # Imported here: slow to import.

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as e:  # tfds fails in many ways; the cause is chained.
        raise FileNotFoundError(f"could not open {name!r} through tensorflow-datasets (data_dir="
                                f"{data_dir!r}): {type(e).__name__}: {e}\nTo get it: "
                                f"{HOW_TO_PREPARE}.") from e
    missing = [s for s in (TRAIN_SPLIT, TEST_SPLIT) if not prepared or s not in builder.info.splits]
    if missing:
        raise FileNotFoundError(
            f"{name} is not prepared in {builder.data_dir} (data_dir={data_dir!r}; missing "
            f"split(s): {', '.join(missing)}). To get it: {HOW_TO_PREPARE}.")
    try:
        train, test = builder.as_data_source(
            split=[TRAIN_SPLIT, TEST_SPLIT], deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except Exception as e:  # e.g. prepared as tfrecord only: no array_record files to read
        raise FileNotFoundError(f"could not read {name} from {builder.data_dir}: "
                                f"{type(e).__name__}: {e}\nIt must be prepared as array_record: "
                                f"{HOW_TO_PREPARE}.") from e
    return builder.info.features, train, test
