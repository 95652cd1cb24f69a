"""specfast.datasets: IDX and CIFAR binary readers on files written here in those formats, the real
Fashion-MNIST when installed, and scikit-learn's digits."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from specfast.datasets import (DatasetError, cifar_available, fashion_mnist_dir, load_cifar, load_digits,
                               load_fashion_mnist, read_idx)


def write_idx(path, a: np.ndarray, gz: bool = False):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    big = a.astype(a.dtype.newbyteorder(">")) if a.dtype.itemsize > 1 else a
    header = bytes([0, 0, codes[big.dtype], a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape)
    data = header + big.tobytes()
    if gz:
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_roundtrip(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((3, 5, 2)) * 100).astype(dtype)
    p = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), a, gz)
    b = read_idx(p)
    assert b.shape == a.shape and np.array_equal(b, a)


def test_read_idx_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DatasetError, match="bad.idx is not an IDX file"):
        read_idx(bad)
    short = write_idx(tmp_path / "short.idx", np.zeros((4, 3), np.uint8))
    short.write_bytes(short.read_bytes()[:-2])
    with pytest.raises(DatasetError, match=r"short.idx holds 10 data bytes; its header \(4, 3\)"):
        read_idx(short)
    with pytest.raises(DatasetError, match="missing.idx"):
        read_idx(tmp_path / "missing.idx")


def _fake_fashion(tmp_path, n_train=12, n_test=5, gz=True):
    rng = np.random.default_rng(1)
    arrays = {}
    for part, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{'.gz' if gz else ''}", x, gz)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{'.gz' if gz else ''}", y, gz)
        arrays[part] = (x, y)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_fashion_mnist_from_written_files(tmp_path, gz):
    arrays = _fake_fashion(tmp_path, gz=gz)
    s = load_fashion_mnist(tmp_path)
    assert s.x_train.shape == (12, 1, 28, 28) and s.x_test.shape == (5, 1, 28, 28)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert torch.equal(s.x_train[:, 0], torch.from_numpy(arrays["train"][0]).float() / 255)
    assert torch.equal(s.y_test, torch.from_numpy(arrays["test"][1]).long())
    assert float(s.x_train.min()) >= 0 and float(s.x_train.max()) <= 1


def test_load_fashion_mnist_errors(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="no Fashion-MNIST IDX files in .*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    _fake_fashion(tmp_path)
    # labels that do not match the images in number
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8), True)
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.gz must hold 5 labels"):
        load_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(5, 11, np.uint8), True)
    with pytest.raises(DatasetError, match="label 11 > 9"):
        load_fashion_mnist(tmp_path)
    monkeypatch.setenv("SPECFAST_FASHION_MNIST", str(tmp_path))
    assert fashion_mnist_dir() == tmp_path           # the environment variable comes first


@pytest.mark.skipif(fashion_mnist_dir() is None, reason="Fashion-MNIST IDX files not installed")
def test_real_fashion_mnist():
    s = load_fashion_mnist()
    assert s.x_train.shape == (60000, 1, 28, 28) and s.x_test.shape == (10000, 1, 28, 28)
    assert torch.equal(s.y_train.bincount(), torch.full((10,), 6000))
    assert torch.equal(s.y_test.bincount(), torch.full((10,), 1000))
    assert 0.25 < float(s.x_train.mean()) < 0.32      # the dataset's known mean pixel is 0.286


def test_digits_split():
    s = load_digits()
    assert s.x_train.shape[1:] == (1, 8, 8) and len(s.x_train) + len(s.x_test) == 1797
    assert float(s.x_train.max()) == 1.0 and float(s.x_train.min()) == 0.0
    frac = s.y_test.bincount().double() / (s.y_test.bincount() + s.y_train.bincount()).double()
    assert ((frac - 0.3).abs() < 0.01).all(), frac        # stratified
    again = load_digits()
    assert torch.equal(again.y_test, s.y_test)           # deterministic


def _write_cifar(directory, num_classes, n_per_file):
    rng = np.random.default_rng(2)
    directory.mkdir(parents=True, exist_ok=True)
    label_bytes = 1 if num_classes == 10 else 2
    names = ([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]) if num_classes == 10 \
        else ["train.bin", "test.bin"]
    content = {}
    for name in names:
        labels = rng.integers(0, num_classes, (n_per_file, label_bytes), dtype=np.uint8)
        if num_classes == 100:
            labels[:, 0] = labels[:, 1] // 5          # a coarse label beside the fine one
        pix = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        (directory / name).write_bytes(np.concatenate([labels, pix], 1).tobytes())
        content[name] = (labels[:, -1], pix)
    return content


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "archive-dir"])
def test_load_cifar_from_written_files(tmp_path, num_classes, nested):
    d = tmp_path / ("cifar-10-batches-bin" if num_classes == 10 else "cifar-100-binary") if nested else tmp_path
    content = _write_cifar(d, num_classes, 3)
    assert cifar_available(tmp_path, num_classes)
    s = load_cifar(tmp_path, num_classes)
    n_train = 15 if num_classes == 10 else 3
    assert s.x_train.shape == (n_train, 3, 32, 32) and s.x_test.shape == (3, 3, 32, 32)
    test_name = "test_batch.bin" if num_classes == 10 else "test.bin"
    labels, pix = content[test_name]
    assert torch.equal(s.y_test, torch.from_numpy(labels.astype(np.int64)))      # the fine label for 100
    # channel-major records: the first 1024 bytes are the red plane, row by row
    assert torch.equal(s.x_test[1, 0].flatten(), torch.from_numpy(pix[1, :1024]).float() / 255)
    assert torch.equal(s.x_test[1, 2].flatten(), torch.from_numpy(pix[1, 2048:]).float() / 255)
    assert s.num_classes == num_classes


def test_load_cifar_errors(tmp_path):
    assert not cifar_available(tmp_path) and not cifar_available(None)
    with pytest.raises(DatasetError, match="missing CIFAR-10 binary file"):
        load_cifar(tmp_path, 10)
    with pytest.raises(ValueError, match="num_classes must be 10 or 100; got 20"):
        load_cifar(tmp_path, 20)
    _write_cifar(tmp_path, 10, 2)
    (tmp_path / "data_batch_3.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match=r"data_batch_3.bin has 100 bytes, not a positive multiple of the 3073"):
        load_cifar(tmp_path, 10)
    _write_cifar(tmp_path, 10, 2)
    rec = bytearray((tmp_path / "test_batch.bin").read_bytes())
    rec[0] = 42
    (tmp_path / "test_batch.bin").write_bytes(bytes(rec))
    with pytest.raises(DatasetError, match="test_batch.bin record 0 has label 42, expected < 10"):
        load_cifar(tmp_path, 10)
