"""Readers of the standard data-set files: IDX (MNIST, Fashion-MNIST), CIFAR-10/100
(python pickles through a restricted unpickler, or the binary version) and SVHN (.mat);
where each data set's files are looked for and how to get them. Nothing downloads.
"""

from __future__ import annotations

import codecs
import gzip
import math
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.io
import torch
from torch import Tensor

from diverse.errors import UserError

#: Where ``fashion-mnist`` is installed by ``apt-get install dataset-fashion-mnist``.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- paths, messages

_HOW_TO_GET = {
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist`, or set [data] "
    "path or DIVERSE_DATA to a folder with the four Fashion-MNIST IDX files (plain or .gz)",
    "mnist": "put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte (plain or .gz) there, or set [data] path or DIVERSE_DATA",
    "cifar10": "unpack CIFAR-10's python version (cifar-10-batches-py/) or binary version "
    "(cifar-10-batches-bin/) there, or set [data] path or DIVERSE_DATA",
    "cifar100": "unpack CIFAR-100's python version (cifar-100-python/) or binary version "
    "(cifar-100-binary/) there, or set [data] path or DIVERSE_DATA",
    "svhn": "put SVHN's train_32x32.mat and test_32x32.mat there, or set [data] path or "
    "DIVERSE_DATA",
}


def data_dir(name: str, path: str = "") -> Path:
    """Folder of dataset ``name``: ``path`` if given; else ``$DIVERSE_DATA/<name>`` if that
    folder exists, else ``$DIVERSE_DATA``; else the system folder for fashion-mnist and
    ``./data/<name>`` for the others."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get("DIVERSE_DATA", "")
    if env:
        root = Path(env).expanduser()
        return root / name if (root / name).is_dir() else root
    return FASHION_MNIST_SYSTEM_DIR if name == "fashion-mnist" else Path("data") / name


def _missing(name: str, what: str, folder: Path) -> UserError:
    return UserError(f"{name}: no {what} in {folder}; {_HOW_TO_GET[name]}")


def _to_tensor_images(x: np.ndarray) -> Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)


def _labels(y: np.ndarray, num_classes: int, source: object) -> Tensor:
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{source}: labels outside 0..{num_classes - 1} (file corrupt?)")
    return torch.from_numpy(y)


# ---------------------------------------------------------------- IDX (MNIST family)

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an IDX file (plain or .gz) of unsigned bytes.

    Header: 4-byte big-endian magic (0x0803 images, 0x0801 labels; the last byte is the
    number of dimensions), then one big-endian uint32 per dimension, then the data.
    Returns uint8 of the header's shape, e.g. (N, 28, 28) or (N,).
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read IDX file {path} ({e}); the file is corrupt, "
                        "download it again") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise UserError(f"{path} is not an IDX file with magic {magic:#010x} (found {found})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise UserError(f"{path} is truncated or corrupt: header says {dims} -> {expected} "
                        f"bytes, file has {len(raw)}; download it again")
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, prefix: str, kind: str) -> Path | None:
    for base in (f"{prefix}-{kind}", f"{prefix}-{kind.replace('-', '.', 1)}"):
        for p in (folder / base, folder / f"{base}.gz"):
            if p.is_file():
                return p
    return None


def _read_mnist_split(name: str, folder: Path, split: str) -> tuple[Tensor, Tensor]:
    """One split of an MNIST-format dataset: x float32 (N, 1, 28, 28) in [0,1], y int64 (N,)."""
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind, magic in (("images-idx3-ubyte", IDX_IMAGES_MAGIC),
                        ("labels-idx1-ubyte", IDX_LABELS_MAGIC)):
        p = _find_idx(folder, prefix, kind)
        if p is None:
            raise _missing(name, f"{prefix}-{kind}[.gz]", folder)
        arrays.append((p, read_idx(p, magic)))
    (p_x, x), (p_y, y) = arrays
    if len(x) != len(y):
        raise UserError(f"{p_x} has {len(x)} images but {p_y} has {len(y)} labels")
    return _to_tensor_images(x[:, None]), _labels(y, 10, p_y)


# ---------------------------------------------------------------- CIFAR


def _np_reconstruct() -> Callable[..., np.ndarray]:
    return np.ndarray((0,)).__reduce__()[0]  # numpy's _reconstruct, whatever its module


#: The only globals a CIFAR pickle may reference (numpy array reconstruction).
_PICKLE_ALLOWED: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    ("codecs", "encode"): codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy-array globals of :data:`_PICKLE_ALLOWED`;
    anything else (e.g. ``os.system``) raises :class:`UserError` before it is called."""

    def __init__(self, file: object, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        obj = _PICKLE_ALLOWED.get((module, name))
        if obj is None:
            raise UserError(f"refusing to unpickle {module}.{name} from {self.source}: "
                            "CIFAR files may only contain numpy arrays; replace the file")
        return obj


def _load_cifar_pickle(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR python-version batch: data uint8 (N, 3072), labels (N,)."""
    try:
        with open(path, "rb") as f:
            d = RestrictedUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as e:  # a corrupt pickle can fail in many ways
        raise UserError(f"cannot unpickle {path} ({type(e).__name__}: {e}); the file is "
                        "corrupt, download it again") from e
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a dict, got {type(d).__name__}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or label_key not in d:
        raise UserError(f"{path}: missing key 'data' or {label_key!r} (has {sorted(d)})")
    x, y = np.asarray(d["data"]), np.asarray(d[label_key])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise UserError(f"{path}: expected data uint8 (N, 3072) and N labels, got "
                        f"{x.dtype} {x.shape} and {len(y)} labels")
    return x, y


def _load_cifar_bin(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR binary-version file: records of ``label_bytes`` + 3072 bytes; the last
    label byte is used (CIFAR-100: fine label). Returns data (N, 3072), labels (N,)."""
    raw = np.fromfile(path, dtype=np.uint8)
    rec = label_bytes + 3072
    if raw.size % rec:
        raise UserError(f"{path}: size {raw.size} is not a multiple of the {rec}-byte record; "
                        "the file is truncated or corrupt")
    raw = raw.reshape(-1, rec)
    return raw[:, label_bytes:], raw[:, label_bytes - 1]


_CIFAR = {  # name -> (python folder, binary folder, train files, test file, label key, classes)
    "cifar10": ("cifar-10-batches-py", "cifar-10-batches-bin",
                tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels", 10),
    "cifar100": ("cifar-100-python", "cifar-100-binary", ("train",), "test", "fine_labels", 100),
}


def _read_cifar_split(name: str, folder: Path, split: str) -> tuple[Tensor, Tensor]:
    """One split of CIFAR-10/100 from ``folder`` or its python/binary subfolder:
    x float32 (N, 3, 32, 32) in [0, 1] (the 3072 row = R, G, B planes, each 32x32
    row-major), y int64 (N,)."""
    py_dir, bin_dir, train_files, test_file, label_key, classes = _CIFAR[name]
    files = train_files if split == "train" else (test_file,)
    for d, binary in ((folder, False), (folder / py_dir, False), (folder, True),
                      (folder / bin_dir, True)):
        suffix = ".bin" if binary else ""
        if (d / f"{files[0]}{suffix}").is_file():
            break
    else:
        raise _missing(name, f"{py_dir}/ or {bin_dir}/ ({files[0]})", folder)
    xs, ys = [], []
    for f in files:
        p = d / f"{f}{suffix}"
        if not p.is_file():
            raise _missing(name, p.name, d)
        x, y = _load_cifar_bin(p, 1 if name == "cifar10" else 2) if binary else \
            _load_cifar_pickle(p, label_key)
        xs.append(x)
        ys.append(_labels(y, classes, p))
    x = np.concatenate(xs).reshape(-1, 3, 32, 32)
    return _to_tensor_images(x), torch.cat(ys)


# ---------------------------------------------------------------- SVHN


def _read_svhn_split(folder: Path, split: str) -> tuple[Tensor, Tensor]:
    """SVHN cropped digits: X (32, 32, 3, N) uint8 -> x float32 (N, 3, 32, 32) in [0, 1];
    y (N, 1) with 10 meaning digit 0 -> int64 (N,) in 0..9."""
    p = folder / f"{split}_32x32.mat"
    if not p.is_file():
        raise _missing("svhn", p.name, folder)
    try:
        m = scipy.io.loadmat(p)
    except Exception as e:  # scipy raises assorted errors on corrupt files
        raise UserError(f"cannot read {p} ({type(e).__name__}: {e}); download it again") from e
    if "X" not in m or "y" not in m:
        raise UserError(f"{p}: expected variables X and y, found {sorted(m)}")
    x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise UserError(f"{p}: expected X (32, 32, 3, N) and y (N, 1), got {x.shape}, {y.shape}")
    y = _labels(y, 11, p) % 10
    return _to_tensor_images(x.astype(np.uint8).transpose(3, 2, 0, 1)), y


