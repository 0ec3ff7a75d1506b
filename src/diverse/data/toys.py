"""Toy datasets: a 1D regression with a gap and three 2D classification problems.

Every generator is a pure function of ``(n_train, noise_std, seed)`` that returns
a :class:`ToyData` of float32/int64 tensors. The training set is drawn from the
random stream ``[seed, 0]`` and the test set from ``[seed, 1]``
(``numpy.random.default_rng``), so the two never share draws and the whole set is
deterministic under ``seed``. ``n_train <= 0`` and ``noise_std < 0`` select the
toy's default. :mod:`diverse.data.datasets` wraps these into ``Dataset`` loaders
(registry names in :data:`TOYS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

#: Training-input intervals of ``regression-1d`` (the gap (2.5, 4.5) has no points).
REGRESSION_1D_INTERVALS: tuple[tuple[float, float], ...] = ((1.5, 2.5), (4.5, 6.0))


class ToyData(NamedTuple):
    """Raw toy data (no normalization).

    Regression: ``x`` float32 (N, 1), ``y`` float32 (N, 1).
    Classification: ``x`` float32 (N, 2), ``y`` int64 (N,).
    """

    task: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_outputs: int


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (train, test) generators from the streams ``[seed, 0]``, ``[seed, 1]``."""
    return np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])


def _pick(value: float, default: float, use_default: bool) -> float:
    return default if use_default else value


def regression_1d_function(x: Tensor) -> Tensor:
    """The noiseless target f(x) = x·sin(x) of ``regression-1d``; any shape."""
    return x * torch.sin(x)


def regression_1d(n_train: int = 0, noise_std: float = -1.0, seed: int = 0) -> ToyData:
    """1D regression y = x·sin(x) + ε, ε ~ N(0, noise_std²) (RDE paper, D'Angelo & Fortuin 2021).

    Train: ``n_train`` (default 90) inputs uniform on [1.5, 2.5] ∪ [4.5, 6], i.e. each
    interval gets points in proportion to its length, as in the reference code that
    drops ranges from U[0, 7]; noise std default 0.25.
    Test: x = linspace(0, 7, 200) with NOISELESS targets y = x·sin(x) (as the reference
    evaluation set), so test error measures the function, not the noise.
    Returns x, y float32 (N, 1).
    """
    n = n_train if n_train > 0 else 90
    sigma = _pick(noise_std, 0.25, noise_std < 0)
    rng_train, _ = _rngs(seed)
    lengths = np.array([hi - lo for lo, hi in REGRESSION_1D_INTERVALS])
    which = rng_train.choice(len(lengths), size=n, p=lengths / lengths.sum())
    lows = np.array([lo for lo, _ in REGRESSION_1D_INTERVALS])[which]
    x = lows + lengths[which] * rng_train.random(n)
    y = x * np.sin(x) + sigma * rng_train.standard_normal(n)
    x_test = torch.linspace(0.0, 7.0, 200).unsqueeze(1)
    return ToyData(
        task="regression",
        x_train=torch.from_numpy(x).float().unsqueeze(1),
        y_train=torch.from_numpy(y).float().unsqueeze(1),
        x_test=x_test,
        y_test=regression_1d_function(x_test),
        num_outputs=1,
    )


def _classification(
    sample: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
    n_train: int,
    n_test: int,
    seed: int,
    num_classes: int,
) -> ToyData:
    rng_train, rng_test = _rngs(seed)
    x_tr, y_tr = sample(rng_train, n_train)
    x_te, y_te = sample(rng_test, n_test)
    return ToyData(
        task="classification",
        x_train=torch.from_numpy(x_tr).float(),
        y_train=torch.from_numpy(y_tr).long(),
        x_test=torch.from_numpy(x_te).float(),
        y_test=torch.from_numpy(y_te).long(),
        num_outputs=num_classes,
    )


def blobs(n_train: int = 0, noise_std: float = -1.0, seed: int = 0) -> ToyData:
    """Five isotropic Gaussian blobs in 2D (the RDE paper's 2D toy).

    Centers equally spaced on the circle of radius 2.5, center k at angle 2πk/5, class k.
    Labels are drawn uniformly; x = center + N(0, noise_std² I), noise_std default 0.5.
    Default 500 train / 500 test points. Returns x float32 (N, 2), y int64 (N,).
    """
    sigma = _pick(noise_std, 0.5, noise_std < 0)
    angles = 2 * math.pi * np.arange(5) / 5
    centers = 2.5 * np.stack([np.cos(angles), np.sin(angles)], axis=1)

    def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 5, size=n)
        return centers[y] + sigma * rng.standard_normal((n, 2)), y

    return _classification(sample, n_train if n_train > 0 else 500, 500, seed, 5)


def two_moons(n_train: int = 0, noise_std: float = -1.0, seed: int = 0) -> ToyData:
    """Two interleaving half circles, as ``sklearn.datasets.make_moons``.

    Class 0: (cos t, sin t); class 1: (1 − cos t, 0.5 − sin t); t ~ U[0, π] (make_moons
    uses an even grid; we draw t so that every seed gives fresh points), each class
    half of the points; then + N(0, noise_std² I), noise_std default 0.1.
    Default 500 train / 500 test. Returns x float32 (N, 2), y int64 (N,).
    """
    sigma = _pick(noise_std, 0.1, noise_std < 0)

    def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (np.arange(n) >= n // 2).astype(np.int64)
        t = math.pi * rng.random(n)
        outer = np.stack([np.cos(t), np.sin(t)], axis=1)
        inner = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], axis=1)
        x = np.where(y[:, None] == 0, outer, inner)
        return x + sigma * rng.standard_normal((n, 2)), y

    return _classification(sample, n_train if n_train > 0 else 500, 500, seed, 2)


def four_quadrants(n_train: int = 0, noise_std: float = -1.0, seed: int = 0) -> ToyData:
    """Label = quadrant of a uniform point in [−1, 1]².

    Classes: 0 (x>0, y>0), 1 (x<0, y>0), 2 (x<0, y<0), 3 (x>0, y<0). The label is taken
    from the clean point; the returned input is point + N(0, noise_std² I) with
    noise_std default 0 (labels a deterministic function of x; > 0 blurs the axes).
    Default 500 train / 500 test. Returns x float32 (N, 2), y int64 (N,).
    """
    sigma = _pick(noise_std, 0.0, noise_std < 0)

    def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        p = rng.uniform(-1.0, 1.0, size=(n, 2))
        right, top = p[:, 0] > 0, p[:, 1] > 0
        y = np.select([right & top, ~right & top, ~right & ~top], [0, 1, 2], default=3)
        return p + sigma * rng.standard_normal((n, 2)), y.astype(np.int64)

    return _classification(sample, n_train if n_train > 0 else 500, 500, seed, 4)


#: Registry name -> generator ``(n_train, noise_std, seed) -> ToyData``.
TOYS: dict[str, Callable[[int, float, int], ToyData]] = {
    "regression-1d": regression_1d,
    "blobs": blobs,
    "two-moons": two_moons,
    "four-quadrants": four_quadrants,
}
