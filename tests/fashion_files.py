"""Fashion-MNIST-layout IDX files of random images, written for the tests (the data loader's and
every end-to-end run's)."""
import gzip

import numpy as np


def write_idx(path, array, compress):
    """Writes `array` as an IDX file (big-endian, like the MNIST files), gzip-compressed if asked."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    dtype = np.dtype(array.dtype)
    header = bytes([0, 0, codes[dtype], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    content = header + array.astype(dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


def raw_fashion(seed, n):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def make_fashion_dir(directory, n_train, n_test):
    """A gzip Fashion-MNIST-layout directory of random images (for end-to-end runs)."""
    for prefix, seed, n in [("train", 0, n_train), ("t10k", 1, n_test)]:
        images, labels = raw_fashion(seed, n)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images, True)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels, True)
    return directory
