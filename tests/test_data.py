"""Tests for pfa_jax.app.data: IDX files, tensorflow-datasets array_record sources, and processing options.

The tfds tests build tiny real array_record datasets with the real MNIST / CIFAR-10 builders (only their
example generation replaced) instead of `tfds.testing.mock_data`: in tensorflow-datasets 4.9.10 the mock
behind `tfds.data_source` breaks batched reads (`__getitems__` raises TypeError: "_getitems() missing 1
required positional argument: 'record_keys'"), and real files also exercise array_record reading and
PNG decoding without TensorFlow.
"""

import gzip
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification import cifar, mnist

from fashion_files import raw_fashion, write_idx

from pfa_jax.app import data

N_TRAIN, N_TEST = 12, 5


@pytest.fixture
def idx_dir(tmp_path):
    """A Fashion-MNIST-layout directory: gzip training files, plain test files."""
    for prefix, (images, labels), compress in [
        ("train", raw_fashion(0, N_TRAIN), True),
        ("t10k", raw_fashion(1, N_TEST), False),
    ]:
        suffix = ".gz" if compress else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return tmp_path


def expected_normalised(raw, train_raw):
    """(x / 255 - mean) / std per channel, with the statistics of `train_raw`, computed in float64."""
    train = train_raw[..., None] / 255.0
    mean, std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
    return (raw[..., None] / 255.0 - mean) / std, mean, std


# --------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trips(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    read = data.read_idx(write_idx(tmp_path / "a", array, compress))
    assert read.dtype == dtype and read.dtype.isnative
    np.testing.assert_array_equal(read, array)


def test_load_idx_dir(idx_dir):
    arrays = data.load_idx_dir(idx_dir)
    train_images, train_labels = raw_fashion(0, N_TRAIN)
    assert arrays["train_images"].dtype == np.uint8 and arrays["train_images"].shape == (N_TRAIN, 28, 28)
    assert arrays["test_images"].shape == (N_TEST, 28, 28) and arrays["test_labels"].shape == (N_TEST,)
    np.testing.assert_array_equal(arrays["train_images"], train_images)
    np.testing.assert_array_equal(arrays["train_labels"], train_labels)


def test_load_fashion_mnist_from_dir(idx_dir):
    ds = data.load("fashion_mnist", data_dir=str(idx_dir))
    train_raw, train_labels = raw_fashion(0, N_TRAIN)
    test_raw, test_labels = raw_fashion(1, N_TEST)
    assert ds.name == "fashion_mnist" and ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
    splits = [(ds.train_images, ds.train_labels, N_TRAIN), (ds.test_images, ds.test_labels, N_TEST)]
    for images, labels, n in splits:
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.float32 and images.flags.c_contiguous
        assert labels.shape == (n,) and labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_labels, train_labels)
    np.testing.assert_array_equal(ds.test_labels, test_labels)

    train_expected, mean, std = expected_normalised(train_raw, train_raw)
    test_expected, _, _ = expected_normalised(test_raw, train_raw)
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(ds.std, std, rtol=1e-12)
    np.testing.assert_allclose(ds.train_images, train_expected, atol=1e-5)
    np.testing.assert_allclose(ds.test_images, test_expected, atol=1e-5)
    np.testing.assert_allclose(ds.train_images.mean(axis=(0, 1, 2)), [0.0], atol=1e-5)
    np.testing.assert_allclose(ds.train_images.std(axis=(0, 1, 2)), [1.0], atol=1e-5)


def test_fashion_mnist_dir_from_environment(idx_dir, monkeypatch):
    monkeypatch.setenv("PFA_JAX_FASHION_MNIST_DIR", str(idx_dir))
    ds = data.load("fashion_mnist")
    assert len(ds.train_labels) == N_TRAIN and len(ds.test_labels) == N_TEST


# ------------------------------------------------------------------------------------ options


def test_holdout_moves_last_training_examples_to_test(idx_dir):
    ds = data.load("fashion_mnist", data_dir=idx_dir, holdout=3)
    train_raw, train_labels = raw_fashion(0, N_TRAIN)
    assert len(ds.train_labels) == N_TRAIN - 3 and len(ds.test_labels) == 3
    np.testing.assert_array_equal(ds.train_labels, train_labels[:-3])
    np.testing.assert_array_equal(ds.test_labels, train_labels[-3:])
    # Statistics come from the remaining training examples only.
    expected, mean, _ = expected_normalised(train_raw[-3:], train_raw[:-3])
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(ds.test_images, expected, atol=1e-5)


@pytest.mark.parametrize("holdout", [-1, N_TRAIN, N_TRAIN + 1])
def test_invalid_holdout(idx_dir, holdout):
    with pytest.raises(ValueError, match=f"holdout.*got {holdout}"):
        data.load("fashion_mnist", data_dir=idx_dir, holdout=holdout)


def test_pad_to_centres_normalised_images_in_zeros(idx_dir):
    plain = data.load("fashion_mnist", data_dir=idx_dir)
    padded = data.load("fashion_mnist", data_dir=idx_dir, pad_to=32)
    assert padded.image_shape == (32, 32, 1) and padded.train_images.dtype == np.float32
    assert padded.test_images.shape == (N_TEST, 32, 32, 1) and padded.train_images.flags.c_contiguous
    np.testing.assert_array_equal(padded.train_images[:, 2:30, 2:30], plain.train_images)
    np.testing.assert_array_equal(padded.test_images[:, 2:30, 2:30], plain.test_images)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not padded.train_images[:, border].any()
    assert padded.mean == plain.mean
    unpadded = data.load("fashion_mnist", data_dir=idx_dir, pad_to=28)
    np.testing.assert_array_equal(unpadded.train_images, plain.train_images)


def test_pad_to_smaller_than_image(idx_dir):
    with pytest.raises(ValueError, match="pad_to=20"):
        data.load("fashion_mnist", data_dir=idx_dir, pad_to=20)


def test_limit(idx_dir):
    ds = data.load("fashion_mnist", data_dir=idx_dir, limit=4)
    train_raw, train_labels = raw_fashion(0, N_TRAIN)
    assert ds.train_images.shape == (4, 28, 28, 1) and ds.test_images.shape == (4, 28, 28, 1)
    np.testing.assert_array_equal(ds.train_labels, train_labels[:4])
    np.testing.assert_array_equal(ds.test_labels, raw_fashion(1, N_TEST)[1][:4])
    np.testing.assert_allclose(ds.mean, expected_normalised(train_raw, train_raw[:4])[1], rtol=1e-12)
    assert len(data.load("fashion_mnist", data_dir=idx_dir, limit=1000).train_labels) == N_TRAIN


def test_limit_with_holdout(idx_dir):
    ds = data.load("fashion_mnist", data_dir=idx_dir, holdout=3, limit=2)
    train_labels = raw_fashion(0, N_TRAIN)[1]
    np.testing.assert_array_equal(ds.train_labels, train_labels[:2])
    np.testing.assert_array_equal(ds.test_labels, train_labels[N_TRAIN - 3 : N_TRAIN - 1])


@pytest.mark.parametrize("limit", [0, -2])
def test_invalid_limit(idx_dir, limit):
    with pytest.raises(ValueError, match=f"limit.*got {limit}"):
        data.load("fashion_mnist", data_dir=idx_dir, limit=limit)


# ------------------------------------------------------------------------------------- errors


def test_unknown_dataset():
    with pytest.raises(ValueError, match="'imagenet'.*fashion_mnist, mnist, cifar10"):
        data.load("imagenet")


def test_missing_idx_file(idx_dir):
    (idx_dir / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.*apt-get install -y dataset-fashion"):
        data.load("fashion_mnist", data_dir=idx_dir)


@pytest.mark.parametrize(
    "name, corrupt, message",
    [
        ("t10k-images-idx3-ubyte", lambda b: b[:-10], "data bytes"),
        ("t10k-images-idx3-ubyte", lambda b: b[:6], "truncated IDX header"),
        ("t10k-labels-idx1-ubyte", lambda b: b"\x00\x00\x42\x01" + b[4:], "not an IDX file"),
        ("t10k-labels-idx1-ubyte", lambda b: b"", "not an IDX file"),
        ("train-images-idx3-ubyte.gz", lambda b: b[: len(b) // 2], "gzip"),
        ("train-labels-idx1-ubyte.gz", lambda b: gzip.compress(gzip.decompress(b)[:-1]), "data bytes"),
    ],
)
def test_corrupt_idx_file(idx_dir, name, corrupt, message):
    path = idx_dir / name
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=f"{name}.*{message}"):
        data.load("fashion_mnist", data_dir=idx_dir)


def test_labels_out_of_range(idx_dir):
    write_idx(idx_dir / "t10k-labels-idx1-ubyte", np.full(N_TEST, 10, np.uint8), compress=False)
    with pytest.raises(ValueError, match=r"labels outside \[0, 10\)"):
        data.load("fashion_mnist", data_dir=idx_dir)


def test_tfds_failure_says_how_to_get_the_data(monkeypatch, tmp_path):
    def unavailable(name, **kwargs):
        raise tfds.core.DatasetNotFoundError(f"no {name} here")

    monkeypatch.setattr(tfds, "data_source", unavailable)
    monkeypatch.setattr(data, "offline_reason", lambda: None)  # online: tfds is asked
    with pytest.raises(FileNotFoundError, match="(?s)'mnist'.*no mnist here.*tfds build mnist"):
        data.load("mnist", data_dir=tmp_path)
    # Without a local IDX directory, Fashion-MNIST falls back to tfds.
    monkeypatch.delenv("PFA_JAX_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError,
                       match="(?s)'fashion_mnist'.*apt-get install -y dataset-fashion-mnist"):
        data.load("fashion_mnist")


def test_offline_an_unprepared_tfds_dataset_fails_at_once_saying_why(monkeypatch, tmp_path):
    def no_network(address, timeout):
        raise OSError(-2, "Name or service not known")

    def never(name, **kwargs):
        raise AssertionError("tfds.data_source would retry its downloads for minutes")

    import socket
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(tfds, "data_source", never)
    with pytest.raises(FileNotFoundError, match="(?s)'mnist' is not prepared in data_dir=.*no "
                       "network \\(cannot reach storage.googleapis.com: Name or service not known"
                       "\\).*tfds build mnist"):
        data.load("mnist", data_dir=str(tmp_path))


# ------------------------------------------------------------------- tensorflow-datasets sources


def fake_tfds_images(shape, n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n)


def build_fake_tfds(builder_cls, shape, data_dir):
    """Prepares `builder_cls`'s dataset in `data_dir` as array_record, from small random images."""

    class Fake(builder_cls, skip_registration=True):
        name = builder_cls.name

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(*fake_tfds_images(shape, N_TRAIN, 0)),
                "test": self._generate_examples(*fake_tfds_images(shape, N_TEST, 1)),
            }

        def _generate_examples(self, images, labels):
            for i, (image, label) in enumerate(zip(images, labels)):
                pil_image = Image.fromarray(image.squeeze(-1) if shape[-1] == 1 else image)
                example = {"image": pil_image, "label": label}
                if "id" in self.info.features:
                    example["id"] = str(i)
                yield i, example

    Fake(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    build_fake_tfds(mnist.MNIST, (28, 28, 1), directory)
    build_fake_tfds(cifar.Cifar10, (32, 32, 3), directory)
    return str(directory)


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_load_tfds(tfds_dir, name, shape):
    ds = data.load(name, data_dir=tfds_dir)
    assert ds.name == name and ds.num_classes == 10 and ds.image_shape == shape
    assert ds.train_images.shape == (N_TRAIN, *shape) and ds.test_images.shape == (N_TEST, *shape)
    assert ds.train_images.dtype == np.float32 and ds.train_images.flags.c_contiguous
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10
    # tfds shuffles records on preparation: compare order-free quantities with the generated data.
    train_raw, train_labels = fake_tfds_images(shape, N_TRAIN, 0)
    np.testing.assert_array_equal(np.sort(ds.train_labels), np.sort(train_labels))
    np.testing.assert_array_equal(np.sort(ds.test_labels), np.sort(fake_tfds_images(shape, N_TEST, 1)[1]))
    np.testing.assert_allclose(ds.mean, (train_raw / 255.0).mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(ds.std, (train_raw / 255.0).std(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(ds.train_images.mean(axis=(0, 1, 2)), np.zeros(shape[-1]), atol=1e-5)
    np.testing.assert_allclose(ds.train_images.std(axis=(0, 1, 2)), np.ones(shape[-1]), atol=1e-5)


def test_tfds_holdout_limit_and_pad(tfds_dir):
    full = data.load("mnist", data_dir=tfds_dir)
    ds = data.load("mnist", data_dir=tfds_dir, holdout=4, limit=3, pad_to=32)
    assert ds.train_images.shape == (3, 32, 32, 1) and ds.test_images.shape == (3, 32, 32, 1)
    np.testing.assert_array_equal(ds.train_labels, full.train_labels[:3])
    np.testing.assert_array_equal(ds.test_labels, full.train_labels[N_TRAIN - 4 : N_TRAIN - 1])


# ------------------------------------------------------------------------- real Fashion-MNIST


@pytest.mark.skipif(
    not os.path.isdir(data.DEFAULT_FASHION_MNIST_DIR), reason="dataset-fashion-mnist is not installed"
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("PFA_JAX_FASHION_MNIST_DIR", raising=False)
    ds = data.load("fashion_mnist")
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.num_classes == 10
    np.testing.assert_array_equal(np.bincount(ds.train_labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1000))
    np.testing.assert_allclose(ds.mean, [0.2860], atol=1e-4)  # the well-known Fashion-MNIST statistics
    np.testing.assert_allclose(ds.std, [0.3530], atol=1e-4)
