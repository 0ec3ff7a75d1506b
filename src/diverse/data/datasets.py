"""Datasets: the ``[data]`` config, the :class:`Dataset` container, loaders and registry.

Real data is read from local files only (nothing is downloaded):

- ``fashion-mnist``, ``mnist``: the four IDX files (plain or ``.gz``).
- ``cifar10``, ``cifar100``: the "python version" pickles (read with a restricted
  unpickler that only rebuilds numpy arrays) or the binary version.
- ``svhn``: ``train_32x32.mat`` and ``test_32x32.mat``.
- ``digits``: scikit-learn's bundled 8x8 digits.
- ``npz``: a bring-your-own .npz file.
- toys (:mod:`diverse.data.toys`): ``regression-1d``, ``blobs``, ``two-moons``, ``four-quadrants``.

A registry loader (:data:`DATASETS`) returns the raw data; :func:`load_dataset`
subsets, builds the OOD sets (:mod:`diverse.data.ood`) and normalizes.
"""

# No `from __future__ import annotations`: DataConfig field types stay real types for
# the TOML -> dataclass converter.
import dataclasses
import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diverse import rundir
from diverse.checkpoint import atomic_write_json
from diverse.data import ood as ood_sets
from diverse.data.readers import (
    _read_cifar_split,
    _read_mnist_split,
    _read_svhn_split,
    data_dir,
)
from diverse.data.toys import TOYS
from diverse.errors import UserError

#: ``[data] task`` values (how an ``npz`` file's targets are read).
TASKS = ("auto", "classification", "regression")


@dataclass(frozen=True)
class DataConfig:
    """The ``[data]`` section of a config.

    Attributes:
        name: dataset, a key of :data:`DATASETS`. Default ``"fashion-mnist"``.
        path: folder with the dataset's files (``npz``: the .npz file). Default ``""``:
            ``$DIVERSE_DATA/<name>`` if that folder exists, else ``$DIVERSE_DATA`` if set,
            else ``/usr/share/datasets/fashion-mnist`` for fashion-mnist and
            ``./data/<name>`` for the others (see :func:`data_dir`).
        ood: OOD set names built for this dataset (:data:`diverse.data.ood.OOD_NAMES`,
            ``npz:PATH``, or ``default`` for :data:`diverse.data.ood.DEFAULT_OOD` of the
            dataset; ``""`` entries are ignored). Default ``()``: none. An ``npz`` file's
            ``x_ood`` is always added as ``"npz"``.
        normalize: standardize inputs by the training set's per-channel (dim 1) mean
            and std; test and OOD sets get the same transform. Default ``True``.
        train_subset: > 0 keeps the first n training examples after a shuffle seeded
            by ``seed`` (quick runs, tests). Default ``0``: all.
        test_subset: > 0 keeps the first n test examples (no shuffle) and caps every
            OOD set to its first n examples. Default ``0``: all.
        n_train: toys: number of training points. Default ``0``: the toy's default.
        noise_std: toys: observation / input noise std. Default ``-1.0``: the toy's default.
        seed: seed of toy generation, the train-subset shuffle, the validation split and
            noise OOD sets. Default ``0``.
        task: ``npz`` only: ``"auto"`` (default: integer labels are classification,
            float targets regression; float targets that are all whole numbers are
            refused as ambiguous), ``"classification"`` (whole-number float labels
            become integer classes) or ``"regression"``.
        augment: random crop with ``crop_padding`` pixels of padding and horizontal flip of
            every training batch (images only; :mod:`diverse.data.augment`; seeded per epoch,
            so a resumed run augments identically). Default ``False``.
        crop_padding: padding of the random crop, ≥ 0 (default 4, the CIFAR setups').
        near_ood: OOD set names counted as *near* OOD in the report, besides the
            built-in table (:func:`diverse.data.ood.ood_group`). Default ``()``.
        validation_fraction: in ``[0, 1)``: the fraction of the training examples (after
            ``train_subset``) held out as a validation split, drawn by a permutation seeded
            by ``seed``. Training never sees them; training-time evaluation uses them
            instead of the test set, and post-hoc calibration (temperature scaling,
            conformal prediction) is fitted on them. Normalization statistics come from
            the remaining training examples. Default ``0.0``: no validation split.
    """

    name: str = "fashion-mnist"
    path: str = ""
    ood: tuple[str, ...] = ()
    normalize: bool = True
    train_subset: int = 0
    test_subset: int = 0
    n_train: int = 0
    noise_std: float = -1.0
    seed: int = 0
    validation_fraction: float = 0.0
    near_ood: tuple[str, ...] = ()
    task: str = "auto"
    augment: bool = False
    crop_padding: int = 4

    def __post_init__(self) -> None:
        for key in ("train_subset", "test_subset", "n_train"):
            if getattr(self, key) < 0:
                raise UserError(f"[data] {key} = {getattr(self, key)} must be >= 0 (0: default)")
        if self.crop_padding < 0:
            raise UserError(f"[data] crop_padding = {self.crop_padding}: must be >= 0")
        if self.task not in TASKS:
            raise UserError(f"[data] task = {self.task!r}: allowed {', '.join(TASKS)}")
        if not 0 <= self.validation_fraction < 1:
            raise UserError(f"[data] validation_fraction = {self.validation_fraction}: must be in "
                            "[0, 1) (0: no validation split)")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset.

    Attributes:
        name: registry name.
        task: ``"classification"`` or ``"regression"``.
        x_train: float32 (N, *input_shape), normalized if the config asked for it.
        y_train: int64 (N,) for classification; float32 (N, D) for regression.
        x_test, y_test: as the training arrays, (N_test, ...).
        num_outputs: number of classes, or regression output dimension D.
        ood: OOD set name -> float32 (K, *input_shape), normalized as ``x_train``.
        mean, std: per-channel (dim 1 of x) normalization applied; 0.0s and 1.0s if none.
        x_val, y_val: the validation split (``[data] validation_fraction``), normalized as
            ``x_train``; ``None`` when there is none.
    """

    name: str
    task: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_outputs: int
    ood: dict[str, Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    x_val: Tensor | None = None
    y_val: Tensor | None = None

    @property
    def has_validation(self) -> bool:
        return self.x_val is not None and len(self.x_val) > 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. (1, 28, 28) or (2,)."""
        return tuple(self.x_train.shape[1:])


def _raw(name: str, task: str, x_tr: Tensor, y_tr: Tensor, x_te: Tensor, y_te: Tensor,
         num_outputs: int, ood: dict[str, Tensor] | None = None) -> Dataset:
    """An un-normalized Dataset (mean 0.0s, std 1.0s, one per channel = dim 1 of x)."""
    c = x_tr.shape[1]
    return Dataset(name, task, x_tr, y_tr, x_te, y_te, num_outputs, ood or {}, (0.0,) * c,
                   (1.0,) * c)


# ---------------------------------------------------------------- registry

#: Image dataset name -> (folder, split) -> (x (N, C, H, W) in [0, 1], y int64 (N,)).
_SPLIT_READERS: dict[str, Callable[[Path, str], tuple[Tensor, Tensor]]] = {
    "fashion-mnist": partial(_read_mnist_split, "fashion-mnist"),
    "mnist": partial(_read_mnist_split, "mnist"),
    "cifar10": partial(_read_cifar_split, "cifar10"),
    "cifar100": partial(_read_cifar_split, "cifar100"),
    "svhn": _read_svhn_split,
}
_NUM_CLASSES = {"fashion-mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}


def _load_image_dataset(name: str, cfg: DataConfig) -> Dataset:
    folder = data_dir(name, cfg.path)
    read = _SPLIT_READERS[name]
    return _raw(name, "classification", *read(folder, "train"), *read(folder, "test"),
                _NUM_CLASSES[name])


def load_test_images(name: str) -> Tensor:
    """Test images of image dataset ``name`` from its default location (:func:`data_dir`
    without a path), float32 (N, C, H, W) in [0, 1]; used for dataset OOD sets."""
    if name not in _SPLIT_READERS:
        raise UserError(f"no test images for {name!r}; allowed: {', '.join(_SPLIT_READERS)}")
    return _SPLIT_READERS[name](data_dir(name), "test")[0]


def load_digits_dataset(cfg: DataConfig) -> Dataset:
    """scikit-learn digits: x float32 (N, 1, 8, 8) = pixel / 16, 10 classes; stratified
    80/20 split with ``random_state=0`` (1437 train / 360 test)."""
    # scikit-learn is imported here, not at the top: it adds seconds to every import
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)
    y = torch.from_numpy(d.target).long()
    i_tr, i_te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target,
                                  random_state=0)
    i_tr, i_te = torch.from_numpy(i_tr), torch.from_numpy(i_te)
    return _raw("digits", "classification", x[i_tr], y[i_tr], x[i_te], y[i_te], 10)


def load_npz(cfg: DataConfig) -> Dataset:
    """Bring-your-own ``cfg.path`` .npz with x_train, y_train, x_test, y_test [, x_ood].

    x: any numeric (N, ...) array, used as given (cast to float32; (N,) becomes (N, 1)).
    Integer y (N,) -> classification, num_outputs = max label + 1; float y (N,) or (N, D)
    -> regression with y float32 (N, D). ``x_ood`` becomes ``ood["npz"]``.
    """
    path = Path(cfg.path).expanduser()
    if not cfg.path or not path.is_file():
        raise UserError(f"npz: [data] path = {cfg.path!r} must name an existing .npz file "
                        "with x_train, y_train, x_test, y_test")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise UserError(f"npz: {path} lacks {', '.join(missing)} (has {sorted(f.files)})")
            a = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"npz: cannot read {path} ({e}); save it with numpy.savez") from e
    x = {k: torch.from_numpy(a[k].astype(np.float32)) for k in ("x_train", "x_test", "x_ood")
         if k in a}
    x = {k: v.unsqueeze(1) if v.dim() == 1 else v for k, v in x.items()}
    for k, v in x.items():
        if v.dim() == 4 and v.shape[3] in (1, 3, 4) and v.shape[1] not in (1, 3, 4):
            raise UserError(f"npz: {k} has shape {tuple(v.shape)}, which looks channels-last "
                            "(N, H, W, C); diverse expects channels-first images (N, C, H, W): "
                            "save x.transpose(0, 3, 1, 2)")
    for k in ("x_test", "x_ood"):
        if k in x and x[k].shape[1:] != x["x_train"].shape[1:]:
            raise UserError(f"npz: {k} has input shape {tuple(x[k].shape[1:])}, x_train has "
                            f"{tuple(x['x_train'].shape[1:])}; they must match")
    y_tr, y_te = a["y_train"], a["y_test"]
    for xs, ys, split in ((x["x_train"], y_tr, "train"), (x["x_test"], y_te, "test")):
        if len(ys) != len(xs):
            raise UserError(f"npz: x_{split} has {len(xs)} rows but y_{split} has {len(ys)}")
    kinds = {y_tr.dtype.kind, y_te.dtype.kind}
    whole = kinds == {"f"} and all(np.isfinite(y).all() and np.array_equal(y, np.round(y))
                                   for y in (y_tr, y_te))
    if cfg.task == "classification" and whole and y_tr.ndim == 1 and y_te.ndim == 1:
        y_tr, y_te = y_tr.astype(np.int64), y_te.astype(np.int64)
        kinds = {"i"}
    elif cfg.task == "classification" and not kinds <= {"i", "u"}:
        raise UserError(f"npz: [data] task = 'classification' needs whole-number labels of "
                        f"shape (N,); got y_train {y_tr.dtype} {y_tr.shape}, y_test "
                        f"{y_te.dtype} {y_te.shape}")
    elif cfg.task == "auto" and whole:
        values = np.unique(np.concatenate([y_tr.ravel(), y_te.ravel()]))
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise UserError(f"npz: y_train / y_test are {y_tr.dtype} but hold only whole numbers "
                        f"({shown}): for classification save integer labels "
                        "(y.astype(int)) or set [data] task = \"classification\"; for "
                        "regression set [data] task = \"regression\"")
    if cfg.task == "regression" and kinds <= {"i", "u"}:
        y_tr, y_te = y_tr.astype(np.float32), y_te.astype(np.float32)
        kinds = {"f"}
    if kinds <= {"i", "u"}:
        if y_tr.ndim != 1 or y_te.ndim != 1 or min(y_tr.min(initial=0), y_te.min(initial=0)) < 0:
            raise UserError("npz: integer labels must be 1-D (N,) arrays of values >= 0")
        task, num = "classification", int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
        check_class_labels(y_tr, y_te, path)
        t_tr, t_te = (torch.from_numpy(y.astype(np.int64)) for y in (y_tr, y_te))
    elif kinds == {"f"}:
        t_tr, t_te = (torch.from_numpy(y.astype(np.float32)).reshape(len(y), -1)
                      for y in (y_tr, y_te))
        if y_tr.ndim > 2 or y_te.ndim > 2 or t_tr.shape[1] != t_te.shape[1]:
            raise UserError(f"npz: regression targets must be (N,) or (N, D) with equal D, got "
                            f"y_train {y_tr.shape}, y_test {y_te.shape}")
        task, num = "regression", t_tr.shape[1]
    else:
        raise UserError(f"npz: y_train / y_test must both be integer (classification) or both "
                        f"float (regression), got {y_tr.dtype} and {y_te.dtype}")
    ood = {"npz": x["x_ood"]} if "x_ood" in x else {}
    return _raw("npz", task, x["x_train"], t_tr, x["x_test"], t_te, num, ood)


def check_class_labels(y_train: np.ndarray, y_test: np.ndarray, source: object) -> None:
    """Classes must be ``0..C−1``, every one present in training, none new in the test set."""
    present = np.unique(y_train)
    unseen = sorted(set(np.unique(y_test).tolist()) - set(present.tolist()))
    if unseen:
        raise UserError(f"{source}: y_test has classes {unseen[:8]} that y_train does not have")
    c = int(y_train.max(initial=0)) + 1
    missing = sorted(set(range(c)) - set(present.tolist()))
    if missing:
        hint = " (1-based labels? subtract 1)" if missing == [0] else ""
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise UserError(f"{source}: class labels must be 0..C-1 with every class in y_train; "
                        f"C = {c} but y_train has no example of class {shown}{hint}")


def check_finite(dataset: Dataset) -> None:
    """UserError naming the first input array (train, validation, test, OOD) or regression
    target array that holds NaN or inf."""
    arrays = {"x_train": dataset.x_train, "x_test": dataset.x_test,
              **({"x_val": dataset.x_val} if dataset.x_val is not None else {}),
              **{f"OOD set {k!r}": v for k, v in dataset.ood.items()}}
    if dataset.task == "regression":
        arrays.update(y_train=dataset.y_train, y_test=dataset.y_test)
    for name, x in arrays.items():
        if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise UserError(f"{dataset.name}: {name} has {bad} NaN or inf value(s); clean the "
                            "data (e.g. np.nan_to_num) or drop those examples")


def _load_toy(name: str, cfg: DataConfig) -> Dataset:
    t = TOYS[name](cfg.n_train, cfg.noise_std, cfg.seed)
    return _raw(name, t.task, t.x_train, t.y_train, t.x_test, t.y_test, t.num_outputs)


#: Registry name -> loader returning the RAW dataset (no subset, no normalization, no
#: config OOD sets); use :func:`load_dataset` for the processed one.
DATASETS: dict[str, Callable[[DataConfig], Dataset]] = {
    **{name: partial(_load_image_dataset, name) for name in _SPLIT_READERS},
    "digits": load_digits_dataset,
    "npz": load_npz,
    **{name: partial(_load_toy, name) for name in TOYS},
}


# ---------------------------------------------------------------- processing


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``x`` (N, C, ...) over all dims but 1;
    a zero std is replaced by 1.0 so constant channels pass unchanged.

    float32 with two passes (torch's CPU reductions sum pairwise, ~1e-7 relative error);
    float64 would be ~25x slower on 60000 images.
    """
    dims = [d for d in range(x.dim()) if d != 1]
    view = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    mean = x.float().mean(dim=dims)
    std = (x - mean.view(view)).square().mean(dim=dims).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x − mean_c) / std_c over channel dim 1 of ``x`` (N, C, ...) in float32; same shape."""
    view = (1, len(mean)) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean, dtype=torch.float32).view(view)
    s = torch.tensor(std, dtype=torch.float32).view(view)
    return (x.float() - m) / s


def denormalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Inverse of :func:`normalize`: x·std_c + mean_c over channel dim 1; same shape."""
    view = (1, len(mean)) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean, dtype=x.dtype).view(view)
    s = torch.tensor(std, dtype=x.dtype).view(view)
    return x * s + m


def ood_names(cfg: DataConfig) -> tuple[str, ...]:
    """``cfg.ood`` with ``""`` dropped, ``default`` expanded (:data:`DEFAULT_OOD`), deduplicated."""
    names: list[str] = []
    for n in cfg.ood:
        expanded = ood_sets.DEFAULT_OOD.get(cfg.name, ()) if n == "default" else (n,)
        names += [m for m in expanded if m and m not in names]
    return tuple(names)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.name``, subset it, build ``cfg.ood`` sets, normalize.

    Order: raw loader -> train subset (seeded shuffle, first ``train_subset``) and test
    subset (first ``test_subset``) -> validation split (``validation_fraction`` of the
    training examples, seeded permutation, at least one example) -> OOD sets from the raw
    subsetted test inputs (capped to ``test_subset`` when set) -> normalization by the
    remaining training set's per-channel mean/std, applied to train, validation, test and
    every OOD set.
    """
    if cfg.name not in DATASETS:
        raise UserError(f"unknown dataset {cfg.name!r}; allowed: {', '.join(DATASETS)}")
    d = DATASETS[cfg.name](cfg)
    x_tr, y_tr, x_te, y_te = d.x_train, d.y_train, d.x_test, d.y_test
    if cfg.train_subset > 0:
        g = torch.Generator().manual_seed(cfg.seed)
        keep = torch.randperm(len(x_tr), generator=g)[: cfg.train_subset]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if cfg.test_subset > 0:
        x_te, y_te = x_te[: cfg.test_subset], y_te[: cfg.test_subset]
    x_val = y_val = None
    if cfg.validation_fraction > 0:
        x_tr, y_tr, x_val, y_val = validation_split(x_tr, y_tr, cfg.validation_fraction,
                                                    cfg.seed)
    ood = dict(d.ood)
    for name in ood_names(cfg):
        ood[name] = ood_sets.build_ood(name, cfg.name, x_te, cfg.seed, load_test_images)
    if cfg.test_subset > 0:
        ood = {k: v[: cfg.test_subset] for k, v in ood.items()}
    check_finite(Dataset(d.name, d.task, x_tr, y_tr, x_te, y_te, d.num_outputs, ood, d.mean,
                         d.std, x_val, y_val))  # before normalization spreads a NaN
    mean, std = d.mean, d.std
    if cfg.normalize:
        mean, std = channel_stats(x_tr)
        x_tr, x_te = normalize(x_tr, mean, std), normalize(x_te, mean, std)
        x_val = None if x_val is None else normalize(x_val, mean, std)
        ood = {k: normalize(v, mean, std) for k, v in ood.items()}
    return Dataset(d.name, d.task, x_tr.contiguous(), y_tr, x_te.contiguous(), y_te,
                   d.num_outputs, ood, mean, std,
                   None if x_val is None else x_val.contiguous(), y_val)


#: Stream of the validation permutation (the train-subset shuffle uses the plain seed).
_VALIDATION_STREAM = 7_777


def validation_split(x: Tensor, y: Tensor, fraction: float, seed: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_val, y_val)``: ``⌈fraction · N⌉`` examples held out at random.

    The permutation is seeded by ``seed`` on a stream of its own; the kept training
    examples stay in their original order. At least one example stays on each side.
    """
    n = len(x)
    held = min(max(1, math.ceil(fraction * n)), n - 1)
    if n < 2:
        raise UserError(f"[data] validation_fraction = {fraction}: {n} training example(s) "
                        "cannot be split")
    g = torch.Generator().manual_seed(seed * 1_000_003 + _VALIDATION_STREAM)
    perm = torch.randperm(n, generator=g)
    val = perm[:held]
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    return x[keep], y[keep], x[val], y[val]


# ---------------------------------------------------------------- what prediction needs

DATA_SPEC_FILE = rundir.DATA


@dataclass(frozen=True)
class DataSpec:
    """What predicting on new inputs needs of a data set: no examples.

    Attributes:
        name, task, num_outputs, mean, std: as :class:`Dataset`.
        input_shape: the shape of one input, e.g. ``(1, 28, 28)``.
    """

    name: str
    task: str
    input_shape: tuple[int, ...]
    num_outputs: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def data_spec(dataset: Dataset) -> DataSpec:
    return DataSpec(dataset.name, dataset.task, dataset.input_shape, dataset.num_outputs,
                    tuple(dataset.mean), tuple(dataset.std))


def write_data_spec(run_dir: Path, dataset: Dataset | DataSpec) -> None:
    """``RUN/data.json``: the :class:`DataSpec` of the training data (atomic)."""
    spec = dataset if isinstance(dataset, DataSpec) else data_spec(dataset)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(run_dir) / DATA_SPEC_FILE, dataclasses.asdict(spec))


def read_data_spec(run_dir: Path) -> DataSpec | None:
    """The run's :class:`DataSpec`, or ``None`` for a run trained before it was written."""
    path = Path(run_dir) / DATA_SPEC_FILE
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return DataSpec(raw["name"], raw["task"], tuple(raw["input_shape"]), int(raw["num_outputs"]),
                    tuple(raw["mean"]), tuple(raw["std"]))
