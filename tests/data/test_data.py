"""Loaders of diverse.data.datasets, on tiny files written in the real formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from diverse.data.datasets import (
    DATASETS,
    DataConfig,
    channel_stats,
    load_dataset,
    normalize,
)
from diverse.data.readers import FASHION_MNIST_SYSTEM_DIR, RestrictedUnpickler, data_dir, read_idx
from diverse.errors import UserError

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------ file writers


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """IDX: big-endian magic, one big-endian uint32 per dim, then the bytes."""
    body = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    body += array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(body)
    else:
        path.write_bytes(body)


def write_mnist(folder: Path, n_train: int = 7, n_test: int = 3, gz: bool = False) -> dict:
    """Four IDX files of random 28x28 images; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = RNG.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", x, 0x803)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", y, 0x801)
        out[prefix] = (x, y)
    return out


def cifar_records(n: int) -> np.ndarray:
    """(n, 3072) uint8: random pixels, with R plane >= 128 > G plane (channel order check)."""
    x = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    x[:, :1024] |= 0x80
    x[:, 1024:2048] &= 0x7F
    return x


def write_cifar10(folder: Path, formats: tuple[str, ...] = ("py",), per_batch: int = 2,
                  n_test: int = 3):
    """The same records as cifar-10-batches-py (protocol-2 pickles with bytes keys, as the
    real files) and/or cifar-10-batches-bin (1 label byte + 3072 bytes per record).
    Returns the first folder written, (x_train, y_train), (x_test, y_test)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    xs = [cifar_records(n_test if n == "test_batch" else per_batch) for n in names]
    ys = [RNG.integers(0, 10, size=len(x)) for x in xs]
    dirs = {"py": folder / "cifar-10-batches-py", "bin": folder / "cifar-10-batches-bin"}
    for fmt in formats:
        dirs[fmt].mkdir(parents=True)
        for name, x, y in zip(names, xs, ys, strict=True):
            if fmt == "bin":
                records = np.concatenate([y[:, None].astype(np.uint8), x], 1)
                (dirs[fmt] / f"{name}.bin").write_bytes(records.tobytes())
            else:
                batch = {b"batch_label": name.encode(), b"labels": y.tolist(), b"data": x,
                         b"filenames": [b"f.png"] * len(x)}
                (dirs[fmt] / name).write_bytes(pickle.dumps(batch, protocol=2))
    train = (np.concatenate(xs[:5]), np.concatenate(ys[:5]))
    return dirs[formats[0]], train, (xs[5], ys[5])


# ------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    written = write_mnist(tmp_path, gz=gz)
    d = load_dataset(DataConfig(name="mnist", path=str(tmp_path), normalize=False))
    for (x_w, y_w), x, y in ((written["train"], d.x_train, d.y_train),
                             (written["t10k"], d.x_test, d.y_test)):
        assert x.dtype == torch.float32 and x.shape == (len(x_w), 1, 28, 28)
        assert torch.equal(x, torch.from_numpy(x_w).float().unsqueeze(1) / 255)
        assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(y_w).long())
    assert d.task == "classification" and d.num_outputs == 10 and d.input_shape == (1, 28, 28)
    assert d.mean == (0.0,) and d.std == (1.0,)


def test_idx_truncated_and_bad_magic(tmp_path):
    x = RNG.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    p = tmp_path / "img"
    write_idx(p, x, 0x803)
    assert np.array_equal(read_idx(p, 0x803), x)
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(UserError, match="truncated"):
        read_idx(p, 0x803)
    with pytest.raises(UserError, match="magic"):
        read_idx(p, 0x801)
    gz = tmp_path / "img.gz"
    write_idx(gz, x, 0x803)
    gz.write_bytes(gz.read_bytes()[:-20])  # cut inside the deflate stream
    with pytest.raises(UserError, match="img.gz"):
        read_idx(gz, 0x803)


def test_truncated_file_in_dataset_gives_user_error(tmp_path):
    write_mnist(tmp_path)
    p = tmp_path / "t10k-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(UserError, match="t10k-labels"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path)))


def test_missing_files_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVERSE_DATA", str(tmp_path))
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as e:
        load_dataset(DataConfig(name="fashion-mnist"))
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte") as e:
        load_dataset(DataConfig(name="mnist", path=str(tmp_path / "nowhere")))
    assert "nowhere" in str(e.value)
    for name, what in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                       ("svhn", "train_32x32.mat")):
        with pytest.raises(UserError, match=what):
            load_dataset(DataConfig(name=name))


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("DIVERSE_DATA", raising=False)
    assert data_dir("fashion-mnist") == FASHION_MNIST_SYSTEM_DIR
    assert data_dir("mnist") == Path("data") / "mnist"
    assert data_dir("mnist", "~/x") == Path.home() / "x"
    monkeypatch.setenv("DIVERSE_DATA", str(tmp_path))
    assert data_dir("mnist") == tmp_path
    (tmp_path / "mnist").mkdir()
    assert data_dir("mnist") == tmp_path / "mnist"
    assert data_dir("mnist", "/explicit") == Path("/explicit")


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("DIVERSE_DATA", raising=False)
    d = DATASETS["fashion-mnist"](DataConfig())
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(d.y_train), torch.full((10,), 6000))
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0


# ------------------------------------------------------------------ CIFAR


@pytest.mark.parametrize("fmt", ["py", "bin"])
def test_cifar10_round_trip(tmp_path, fmt):
    folder, (x_tr, y_tr), (x_te, y_te) = write_cifar10(tmp_path, formats=(fmt,))
    for path in (tmp_path, folder):  # parent or the folder itself
        d = load_dataset(DataConfig(name="cifar10", path=str(path), normalize=False))
        assert d.x_train.shape == (10, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
        assert torch.equal(d.x_train, torch.from_numpy(x_tr).float().view(-1, 3, 32, 32) / 255)
        assert torch.equal(d.x_test, torch.from_numpy(x_te).float().view(-1, 3, 32, 32) / 255)
        assert torch.equal(d.y_train, torch.from_numpy(y_tr)) and torch.equal(
            d.y_test, torch.from_numpy(y_te))
    # channel 0 is the first 1024 bytes (R), row-major 32x32: pixel (h, w) = byte 32h + w
    assert (d.x_train[:, 0] >= 128 / 255).all() and (d.x_train[:, 1] < 128 / 255).all()
    assert d.x_test[1, 2, 3, 5] == x_te[1, 2048 + 32 * 3 + 5] / 255
    assert d.num_outputs == 10


def test_cifar_pickle_and_binary_agree(tmp_path):
    write_cifar10(tmp_path, formats=("py", "bin"))
    a, b = (DATASETS["cifar10"](DataConfig(path=str(tmp_path / f"cifar-10-batches-{f}")))
            for f in ("py", "bin"))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)


def test_cifar100_pickle_and_binary(tmp_path):
    x = {s: cifar_records(n) for s, n in (("train", 4), ("test", 2))}
    y = {s: RNG.integers(0, 100, size=len(x[s])) for s in x}
    py, bn = tmp_path / "cifar-100-python", tmp_path / "cifar-100-binary"
    py.mkdir()
    bn.mkdir()
    for s in x:
        batch = {b"fine_labels": y[s].tolist(), b"coarse_labels": (y[s] // 5).tolist(),
                 b"data": x[s]}
        (py / s).write_bytes(pickle.dumps(batch, protocol=2))
        labels = np.stack([y[s] // 5, y[s]], 1).astype(np.uint8)
        (bn / f"{s}.bin").write_bytes(np.concatenate([labels, x[s]], 1).tobytes())
    for path in (py, bn):
        d = load_dataset(DataConfig(name="cifar100", path=str(path), normalize=False))
        assert d.num_outputs == 100
        assert torch.equal(d.y_train, torch.from_numpy(y["train"]))
        assert torch.equal(d.x_test, torch.from_numpy(x["test"]).float().view(-1, 3, 32, 32) / 255)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(
        pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(UserError, match=r"refusing to unpickle (posix|nt|os)\.system"):
        load_dataset(DataConfig(name="cifar10", path=str(folder)))
    assert not marker.exists()
    evil_eval = b"cbuiltins\neval\n(V__import__('os')\ntR."
    with pytest.raises(UserError, match="refusing to unpickle builtins.eval"):
        RestrictedUnpickler(__import__("io").BytesIO(evil_eval), Path("x")).load()


def test_corrupt_pickle(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    p = folder / "test_batch"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot unpickle .*test_batch"):
        DATASETS["cifar10"](DataConfig(path=str(folder)))


# ------------------------------------------------------------------ SVHN, digits, npz


def test_svhn_mat(tmp_path):
    for split, n in (("train", 5), ("test", 4)):
        X = RNG.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [9], [10], [3]][:n], dtype=np.uint8)
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": X, "y": y})
        if split == "test":
            X_te = X
    d = load_dataset(DataConfig(name="svhn", path=str(tmp_path), normalize=False))
    assert d.x_train.shape == (5, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert torch.equal(d.y_test, torch.tensor([0, 1, 9, 0]))
    assert torch.equal(d.x_test, torch.from_numpy(X_te).permute(3, 2, 0, 1).float() / 255)
    assert d.x_test[2, 1, 7, 4] == X_te[7, 4, 1, 2] / 255
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(UserError, match="test_32x32.mat"):
        load_dataset(DataConfig(name="svhn", path=str(tmp_path)))


def test_digits():
    d = load_dataset(DataConfig(name="digits", normalize=False))
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    frac = torch.bincount(d.y_test, minlength=10) / torch.bincount(d.y_train, minlength=10)
    assert torch.allclose(frac, torch.full((10,), 0.25), atol=0.02)  # stratified 80/20
    again = load_dataset(DataConfig(name="digits", normalize=False))
    assert torch.equal(again.x_test, d.x_test) and torch.equal(again.y_test, d.y_test)


def test_npz_classification_and_regression(tmp_path):
    x_tr, x_te, x_ood = (RNG.random((n, 2, 3)) for n in (6, 4, 5))
    p = tmp_path / "c.npz"
    np.savez(p, x_train=x_tr, y_train=np.array([0, 2, 1, 3, 4, 1]), x_test=x_te,
             y_test=np.array([4, 0, 1, 2]), x_ood=x_ood)
    d = load_dataset(DataConfig(name="npz", path=str(p), normalize=False))
    assert d.task == "classification" and d.num_outputs == 5 and d.input_shape == (2, 3)
    assert torch.equal(d.x_train, torch.from_numpy(x_tr).float())
    assert torch.equal(d.y_test, torch.tensor([4, 0, 1, 2]))
    assert torch.equal(d.ood["npz"], torch.from_numpy(x_ood).float())
    p = tmp_path / "r.npz"
    np.savez(p, x_train=RNG.random(6), y_train=RNG.random(6), x_test=RNG.random(3),
             y_test=RNG.random(3))
    d = load_dataset(DataConfig(name="npz", path=str(p)))
    assert d.task == "regression" and d.num_outputs == 1
    assert d.x_train.shape == (6, 1) and d.y_train.shape == (6, 1) and d.y_test.shape == (3, 1)
    assert d.ood == {}


def test_npz_errors(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, x_train=np.zeros((3, 2)), y_train=np.zeros(3, dtype=int), x_test=np.zeros((2, 2)))
    with pytest.raises(UserError, match="lacks y_test"):
        load_dataset(DataConfig(name="npz", path=str(p)))
    np.savez(p, x_train=np.zeros((3, 2)), y_train=np.zeros(3, dtype=int),
             x_test=np.zeros((2, 5)), y_test=np.zeros(2, dtype=int))
    with pytest.raises(UserError, match="x_test has input shape"):
        load_dataset(DataConfig(name="npz", path=str(p)))
    np.savez(p, x_train=np.zeros((3, 2)), y_train=np.zeros(4, dtype=int),
             x_test=np.zeros((2, 2)), y_test=np.zeros(2, dtype=int))
    with pytest.raises(UserError, match="x_train has 3 rows but y_train has 4"):
        load_dataset(DataConfig(name="npz", path=str(p)))
    np.savez(p, x_train=np.zeros((3, 2)), y_train=np.zeros(3, dtype=int),
             x_test=np.zeros((2, 2)), y_test=np.zeros(2))
    with pytest.raises(UserError, match="both be integer"):
        load_dataset(DataConfig(name="npz", path=str(p)))
    np.savez(p, x_train=np.array([object()] * 3), y_train=np.zeros(3, dtype=int),
             x_test=np.zeros((2, 2)), y_test=np.zeros(2, dtype=int))
    with pytest.raises(UserError, match="cannot read"):
        load_dataset(DataConfig(name="npz", path=str(p)))
    with pytest.raises(UserError, match="must name an existing .npz"):
        load_dataset(DataConfig(name="npz"))


# ------------------------------------------------------------------ processing


def test_normalization_per_channel(tmp_path):
    folder, _, _ = write_cifar10(tmp_path, per_batch=40)
    cfg = DataConfig(name="cifar10", path=str(folder), ood=("flipped",))
    raw = load_dataset(DataConfig(name="cifar10", path=str(folder), normalize=False,
                                  ood=("flipped",)))
    d = load_dataset(cfg)
    assert torch.allclose(d.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(d.x_train.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-5)
    mean = raw.x_train.double().mean(dim=(0, 2, 3))
    assert np.allclose(d.mean, mean.numpy(), atol=1e-6) and d.mean[0] > 0.7 > 0.3 > d.mean[1]
    assert torch.allclose(d.x_test, normalize(raw.x_test, d.mean, d.std))
    assert torch.allclose(d.ood["flipped"], normalize(raw.ood["flipped"], d.mean, d.std))
    assert channel_stats(torch.ones(5, 2)) == ((1.0, 1.0), (1.0, 1.0))  # constant: std -> 1


def test_subsets(tmp_path):
    write_mnist(tmp_path, n_train=20, n_test=10)
    full = load_dataset(DataConfig(name="mnist", path=str(tmp_path), normalize=False))

    def sub(seed):
        return load_dataset(DataConfig(name="mnist", path=str(tmp_path), normalize=False,
                                       train_subset=5, test_subset=4, seed=seed,
                                       ood=("uniform", "rotated")))
    a, b, c = sub(0), sub(0), sub(1)
    assert a.x_train.shape[0] == 5 and torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.y_train, c.y_train) or not torch.equal(a.x_train, c.x_train)
    rows = [int(torch.nonzero((full.x_train == r).flatten(1).all(1))[0]) for r in a.x_train]
    assert len(set(rows)) == 5  # distinct training examples
    assert torch.equal(a.x_test, full.x_test[:4])
    assert {k: len(v) for k, v in a.ood.items()} == {"uniform": 4, "rotated": 4}


def test_config_errors():
    with pytest.raises(UserError, match="unknown dataset 'imagenet'; allowed: .*fashion-mnist"):
        load_dataset(DataConfig(name="imagenet"))
    with pytest.raises(UserError, match="train_subset = -1"):
        DataConfig(train_subset=-1)


def test_registry_names():
    assert set(DATASETS) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "digits",
                             "npz", "regression-1d", "blobs", "two-moons", "four-quadrants"}


# ------------------------------------------------------------------ dataset OOD sets


def test_dataset_ood_from_diverse_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVERSE_DATA", str(tmp_path))
    fm = write_mnist(tmp_path / "fashion-mnist")
    mn = write_mnist(tmp_path / "mnist", n_test=5)
    d = load_dataset(DataConfig(name="fashion-mnist", normalize=False, ood=("mnist", "default")))
    assert torch.equal(d.x_test, torch.from_numpy(fm["t10k"][0]).float().unsqueeze(1) / 255)
    assert torch.equal(d.ood["mnist"], torch.from_numpy(mn["t10k"][0]).float().unsqueeze(1) / 255)
    assert list(d.ood) == ["mnist", "digits", "uniform", "gaussian", "rotated", "flipped"]
    folder, _, _ = write_cifar10(tmp_path / "c")
    c = load_dataset(DataConfig(name="cifar10", path=str(folder), normalize=False,
                                ood=("mnist",)))
    assert c.ood["mnist"].shape == (5, 3, 32, 32)
    assert torch.equal(c.ood["mnist"][:, 0], c.ood["mnist"][:, 2])  # gray repeated to RGB
    with pytest.raises(UserError, match="svhn: no test_32x32.mat"):
        load_dataset(DataConfig(name="cifar10", path=str(folder), ood=("svhn",)))


def test_denormalize_inverts_normalize():
    from diverse.data.datasets import denormalize, normalize

    x = torch.rand(5, 3, 4, 4)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    torch.testing.assert_close(denormalize(normalize(x, mean, std), mean, std), x)
