"""Out-of-distribution (OOD) input sets.

:func:`build_ood` makes one OOD set of the in-distribution input shape from the raw
(un-normalized, [0, 1]) test inputs; :func:`diverse.data.datasets.load_dataset` then applies
the training set's normalization to it. Names (:data:`OOD_NAMES`):

- ``digits``: scikit-learn's 8x8 digits (1797, /16 to [0, 1]) resized to the
  in-distribution image size (bilinear, antialias) and channel count.
- ``mnist``, ``fashion-mnist``, ``svhn``, ``cifar10``, ``cifar100``: the test split of
  that dataset from its default / ``DIVERSE_DATA`` location (see
  :func:`diverse.data.readers.data_dir`), resized and channel-converted when shapes differ.
- ``uniform``: U[0, 1] images; ``gaussian``: N(0.5, 0.25²) clipped to [0, 1]. Both
  min(len(test), 10000) examples, seeded by ``seed``.
- ``rotated``: test images rotated by 90° (``torch.rot90`` over H, W);
  ``flipped``: test images upside-down (flip over H).
- ``synthetic``: synthetic outliers (:mod:`diverse.data.outliers`: generated patterns and
  heavily transformed *test* images), min(len(test), 2000) of them, seeded by ``seed``
  on a stream of their own (training-time outliers use other seeds).
- ``npz:PATH``: the ``x_ood`` array of the .npz file PATH, as given (no rescaling).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diverse.errors import UserError

#: Datasets usable as OOD sets by name (their test split).
DATASET_OOD: tuple[str, ...] = ("mnist", "fashion-mnist", "svhn", "cifar10", "cifar100")
#: All OOD names; also accepted: ``npz:PATH``.
OOD_NAMES: tuple[str, ...] = ("digits", *DATASET_OOD, "uniform", "gaussian", "rotated", "flipped",
                              "synthetic")

_IMAGE_DEFAULT: tuple[str, ...] = ("digits", "uniform", "gaussian", "rotated", "flipped")
#: OOD sets used for ``ood = ["default"]``: only ones that need no extra files.
DEFAULT_OOD: dict[str, tuple[str, ...]] = {
    "fashion-mnist": _IMAGE_DEFAULT,
    "mnist": _IMAGE_DEFAULT,
    "cifar10": _IMAGE_DEFAULT,
    "cifar100": _IMAGE_DEFAULT,
    "svhn": _IMAGE_DEFAULT,
    "digits": ("uniform", "gaussian", "rotated", "flipped"),
}

#: ITU-R BT.601 luma weights for RGB -> gray.
_LUMA = (0.299, 0.587, 0.114)
_NOISE_STREAM = {"uniform": 100, "gaussian": 101}
_SYNTHETIC_STREAM = 102


def resize_images(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Fit images ``x`` (K, C', H', W') in [0, 1] to ``shape`` = (C, H, W).

    Channels: 1 -> C by repetition, 3 -> 1 by BT.601 luma; other conversions raise.
    Space: bilinear interpolation with antialias (a no-op when H, W already match).
    Both are convex combinations, so values stay in the input's range.
    Returns float32 (K, C, H, W).
    """
    c, h, w = shape
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif x.shape[1] == 3 and c == 1:
            x = torch.einsum("kchw,c->khw", x, torch.tensor(_LUMA)).unsqueeze(1)
        else:
            raise UserError(
                f"cannot convert {x.shape[1]}-channel OOD images to {c} channels; "
                "only 1 -> C and 3 -> 1 are supported"
            )
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x.float().contiguous()


_MNIST_LIKE = ("mnist", "fashion-mnist", "digits")
_CIFAR_LIKE = ("cifar10", "cifar100")
_TRANSFORMED = ("rotated", "flipped", "synthetic")
#: In-distribution data set -> the OOD sets counted as *near* OOD (the rest are *far*).
#: After OpenOOD v1.5 (Zhang et al. 2023): semantically close data sets of the same
#: kind are near (MNIST-like vs MNIST-like, CIFAR-10 vs CIFAR-100), noise and other
#: kinds of image are far; transformed test images and synthetic outliers (built
#: from test images) are near.
NEAR_OOD: dict[str, tuple[str, ...]] = {
    **{name: tuple(n for n in _MNIST_LIKE if n != name) + _TRANSFORMED for name in _MNIST_LIKE},
    **{name: tuple(n for n in _CIFAR_LIKE if n != name) + _TRANSFORMED for name in _CIFAR_LIKE},
}


def ood_group(name: str, dataset: str, near: tuple[str, ...] = ()) -> str:
    """``"near"`` or ``"far"``: how OOD set ``name`` relates to in-distribution ``dataset``.

    :data:`NEAR_OOD` decides (transformed test images and synthetic outliers are near
    for any data set); ``near`` names further sets to count as near
    (``[data] near_ood``, e.g. a user's ``npz`` set).
    """
    if name in near or name in NEAR_OOD.get(dataset, _TRANSFORMED):
        return "near"
    return "far"


def digits_images() -> Tensor:
    """scikit-learn's digits as float32 (1797, 1, 8, 8) in [0, 1] (pixel / 16)."""
    from sklearn.datasets import load_digits  # lazy: importing scikit-learn takes seconds

    return torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)


def noise_images(kind: str, shape: tuple[int, ...], count: int, seed: int) -> Tensor:
    """``count`` noise inputs of ``shape``: ``uniform`` U[0,1] or ``gaussian`` N(0.5, 0.25²)
    clipped to [0, 1]; stream ``[seed, 100 | 101]``. Returns float32 (count, *shape)."""
    rng = np.random.default_rng([seed, _NOISE_STREAM[kind]])
    size = (count, *shape)
    x = rng.random(size) if kind == "uniform" else rng.normal(0.5, 0.25, size).clip(0.0, 1.0)
    return torch.from_numpy(x).float()


def load_npz_ood(path: str) -> Tensor:
    """The ``x_ood`` array of the .npz file ``path`` as float32 (K, ...)."""
    try:
        with np.load(Path(path).expanduser(), allow_pickle=False) as f:
            if "x_ood" not in f.files:
                raise UserError(f"OOD file {path} has no array 'x_ood' (has: {sorted(f.files)})")
            return torch.from_numpy(np.asarray(f["x_ood"], dtype=np.float32))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read OOD file npz:{path} ({e}); give an existing .npz") from e


def _require_images(name: str, x: Tensor) -> None:
    if x.dim() != 4:
        raise UserError(
            f"OOD set {name!r} needs image inputs (N, C, H, W), got input shape "
            f"{tuple(x.shape[1:])}; use 'uniform', 'gaussian' or 'npz:PATH' instead"
        )


def build_ood(
    name: str,
    dataset_name: str,
    x_test: Tensor,
    seed: int,
    load_test: Callable[[str], Tensor],
) -> Tensor:
    """Build the OOD set ``name`` for the in-distribution dataset ``dataset_name``.

    Args:
        name: one of :data:`OOD_NAMES` or ``npz:PATH``.
        dataset_name: the in-distribution registry name (an OOD set may not equal it).
        x_test: raw in-distribution test inputs, float32 (N, *input_shape), in [0, 1]
            for images.
        seed: seed of the noise sets.
        load_test: dataset name -> its raw test images (K, C, H, W) in [0, 1]
            (:func:`diverse.data.datasets.load_test_images`).

    Returns:
        float32 (K, *input_shape), un-normalized.
    """
    shape = tuple(x_test.shape[1:])
    if name.startswith("npz:"):
        x = load_npz_ood(name[4:])
        if x.dim() == 4 and len(shape) == 3 and tuple(x.shape[1:]) != shape:
            return resize_images(x, shape)
        if tuple(x.shape[1:]) != shape:
            raise UserError(
                f"OOD set {name!r} has input shape {tuple(x.shape[1:])}, "
                f"expected {shape} as {dataset_name!r}"
            )
        return x
    if name not in OOD_NAMES:
        raise UserError(
            f"unknown OOD set {name!r}; allowed: {', '.join(OOD_NAMES)}, npz:PATH, default"
        )
    if name == dataset_name:
        raise UserError(f"OOD set {name!r} is the in-distribution dataset itself; pick another")
    if name in _NOISE_STREAM:
        return noise_images(name, shape, min(len(x_test), 10000), seed)
    _require_images(name, x_test)
    if name == "rotated":  # non-square images are resized back after the rotation
        x = torch.rot90(x_test, k=1, dims=(2, 3))
        return x if x.shape[1:] == x_test.shape[1:] else resize_images(x, shape)
    if name == "flipped":
        return torch.flip(x_test, dims=(2,))
    if name == "synthetic":
        from diverse.data.outliers import synthetic_outliers

        gen = torch.Generator().manual_seed(seed * 1_000 + _SYNTHETIC_STREAM)
        return synthetic_outliers(x_test.clamp(0, 1), min(len(x_test), 2000), gen)
    source = digits_images() if name == "digits" else load_test(name)
    return resize_images(source, shape)
