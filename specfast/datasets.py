"""Offline image datasets for the stability experiments (benchmarks/paper_repro.py).

Nothing is downloaded: each loader reads files already on the machine and names the file it could
not read. Images come back as float32 tensors in [0, 1] shaped [N, C, H, W], labels as int64 [N].

- Fashion-MNIST: the four IDX files (optionally gzipped), e.g. from the Debian package
  ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist) or any directory holding them.
- digits: scikit-learn's 1797 real handwritten 8×8 digits (shipped inside scikit-learn), split
  70/30 per class with a fixed seed.
- CIFAR-10 / CIFAR-100: the standard binary format ("CIFAR-10 binary version": data_batch_1..5.bin
  and test_batch.bin, records of 1 label byte + 3072 pixel bytes; CIFAR-100: train.bin and test.bin,
  records of a coarse and a fine label byte + 3072 pixel bytes), from a directory the user supplies.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                       "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
# IDX type codes (http-free description: magic = 0, 0, type code, number of dimensions)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
CIFAR_RECORD = 3072   # 32 × 32 × 3 pixel bytes, channel-major (all red, then green, then blue)


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file."""


@dataclass
class Split:
    """Train and test tensors of one dataset: images float32 [N, C, H, W] in [0, 1], labels int64 [N]."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __repr__(self) -> str:
        return (f"Split({self.name}: train {tuple(self.x_train.shape)}, test {tuple(self.x_test.shape)}, "
                f"{self.num_classes} classes)")


def read_idx(path) -> np.ndarray:
    """An IDX file (gzipped when its name ends in .gz) as a numpy array of its stored type and shape."""
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DatasetError(f"read_idx: cannot read {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(f"read_idx: {path} is not an IDX file (magic bytes {list(raw[:4])}; expected "
                           f"[0, 0, type code in {sorted(_IDX_TYPES)}, ndim])")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"read_idx: {path} is truncated inside its header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != want:
        raise DatasetError(f"read_idx: {path} holds {len(raw) - header} data bytes; its header {shape} "
                           f"({dtype}) needs {want}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path:
    for cand in (directory / stem, directory / (stem + ".gz")):
        if cand.exists():
            return cand
    raise DatasetError(f"load_fashion_mnist: {directory} has no {stem} or {stem}.gz")


def _images(a: np.ndarray, path, shape_tail) -> torch.Tensor:
    if a.ndim != 3 or a.shape[1:] != shape_tail or a.dtype != np.uint8:
        raise DatasetError(f"load_fashion_mnist: {path} must hold uint8 images [N, 28, 28]; got {a.dtype} {a.shape}")
    return torch.from_numpy(a.copy()).float().div_(255.0)[:, None]


def fashion_mnist_dir(root=None) -> Path | None:
    """The first directory holding the Fashion-MNIST files: root, $SPECFAST_FASHION_MNIST, the Debian path."""
    cands = [root] if root is not None else [os.environ.get("SPECFAST_FASHION_MNIST"), *FASHION_MNIST_DIRS]
    for c in cands:
        if c and Path(c).is_dir() and any((Path(c) / (f + s)).exists() for f in FASHION_MNIST_FILES.values()
                                          for s in ("", ".gz")):
            return Path(c)
    return None


def load_fashion_mnist(root=None) -> Split:
    """Full Fashion-MNIST: 60 000 training and 10 000 test images, 1×28×28, 10 classes."""
    d = fashion_mnist_dir(root)
    if d is None:
        where = root if root is not None else ", ".join(["$SPECFAST_FASHION_MNIST", *FASHION_MNIST_DIRS])
        raise DatasetError(f"load_fashion_mnist: no Fashion-MNIST IDX files in {where} (on Debian/Ubuntu: "
                           f"apt-get install dataset-fashion-mnist)")
    paths = {k: _find(d, v) for k, v in FASHION_MNIST_FILES.items()}
    arr = {k: read_idx(p) for k, p in paths.items()}
    out = {}
    for part in ("train", "test"):
        x = _images(arr[f"{part}_images"], paths[f"{part}_images"], (28, 28))
        y = arr[f"{part}_labels"]
        if y.ndim != 1 or len(y) != len(x):
            raise DatasetError(f"load_fashion_mnist: {paths[f'{part}_labels']} must hold {len(x)} labels (one per "
                               f"image of {paths[f'{part}_images']}); got shape {y.shape}")
        if y.max() > 9:
            raise DatasetError(f"load_fashion_mnist: {paths[f'{part}_labels']} has label {int(y.max())} > 9")
        out[part] = (x, torch.from_numpy(y.astype(np.int64)))
    return Split("fashion_mnist", *out["train"], *out["test"], num_classes=10)


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Split:
    """scikit-learn's real handwritten digits (1797 images 1×8×8, 16 grey levels), split per class."""
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: int(round(test_fraction * len(idx)))]] = True
    return Split("digits", x[~test], y[~test], x[test], y[test], num_classes=10)


def _read_cifar_file(path: Path, label_bytes: int, label_index: int, num_classes: int):
    rec = label_bytes + CIFAR_RECORD
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"load_cifar: cannot read {path}: {e}") from e
    if raw.size == 0 or raw.size % rec:
        raise DatasetError(f"load_cifar: {path} has {raw.size} bytes, not a positive multiple of the "
                           f"{rec}-byte record ({label_bytes} label byte(s) + {CIFAR_RECORD} pixels)")
    raw = raw.reshape(-1, rec)
    y = raw[:, label_index].astype(np.int64)
    if y.max() >= num_classes:
        bad = int(np.argmax(y >= num_classes))
        raise DatasetError(f"load_cifar: {path} record {bad} has label {int(y[bad])}, expected < {num_classes}")
    x = torch.from_numpy(raw[:, label_bytes:].copy()).float().div_(255.0).reshape(-1, 3, 32, 32)
    return x, torch.from_numpy(y)


def load_cifar(root, num_classes: int = 10) -> Split:
    """CIFAR-10 or CIFAR-100 (fine labels) from the standard binary files in ``root`` (or in its
    ``cifar-10-batches-bin`` / ``cifar-100-binary`` subdirectory, as the archives unpack)."""
    if num_classes not in (10, 100):
        raise ValueError(f"load_cifar: num_classes must be 10 or 100; got {num_classes!r}")
    root = Path(root)
    sub = root / ("cifar-10-batches-bin" if num_classes == 10 else "cifar-100-binary")
    d = sub if sub.is_dir() else root
    if num_classes == 10:
        train_files = [d / f"data_batch_{i}.bin" for i in range(1, 6)]
        test_files = [d / "test_batch.bin"]
        label_bytes, label_index = 1, 0
    else:
        train_files, test_files = [d / "train.bin"], [d / "test.bin"]
        label_bytes, label_index = 2, 1    # coarse label, then fine label
    missing = [str(f) for f in train_files + test_files if not f.exists()]
    if missing:
        raise DatasetError(f"load_cifar: missing CIFAR-{num_classes} binary file(s) {missing}")
    parts = []
    for files in (train_files, test_files):
        xs, ys = zip(*(_read_cifar_file(f, label_bytes, label_index, num_classes) for f in files))
        parts += [torch.cat(xs), torch.cat(ys)]
    return Split(f"cifar{num_classes}", *parts, num_classes=num_classes)


def cifar_available(root, num_classes: int = 10) -> bool:
    """Whether ``root`` holds the CIFAR-10/100 binary files (the experiments skip CIFAR otherwise)."""
    if root is None or not Path(root).is_dir():
        return False
    sub = Path(root) / ("cifar-10-batches-bin" if num_classes == 10 else "cifar-100-binary")
    d = sub if sub.is_dir() else Path(root)
    names = ["test_batch.bin"] + [f"data_batch_{i}.bin" for i in range(1, 6)] if num_classes == 10 \
        else ["train.bin", "test.bin"]
    return all((d / n).exists() for n in names)
