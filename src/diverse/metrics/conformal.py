"""Split conformal prediction: sets for classification, intervals for regression.

Pure functions on tensors. Split conformal (Vovk et al. 2005; Papadopoulos et
al. 2002): a nonconformity score ``s(x, y)`` is computed on ``n`` held-out
calibration examples, and for a miscoverage level ``α`` the threshold is the
``k``-th smallest calibration score, ``k = ⌈(n + 1)(1 − α)⌉``
(:func:`conformal_quantile`; ``+∞`` when ``k > n``). The prediction set of a new
input is ``{y : s(x, y) ≤ q̂}``; if calibration and test examples are
exchangeable, ``P(y ∈ set) ≥ 1 − α`` (and ``≤ 1 − α + 1/(n + 1)`` for
continuous, tie-free scores, which the randomized APS/RAPS scores are).

Classification scores of the ensemble's predictive ``p̄ (N, C)``
(:func:`class_scores` returns ``s(x, c)`` for every class ``c``, ``(N, C)``):

* ``lac`` (least ambiguous set-valued classifier, a.k.a. THR; Sadinle, Lei &
  Wasserman 2019): ``s = 1 − p̄_y``.
* ``aps`` (adaptive prediction sets; Romano, Sesia & Candès 2020): with the
  classes ranked by ``p̄`` (descending, ties by class index),
  ``s = Σ_{j ranked above y} p̄_j + u · p̄_y``, ``u ~ U(0, 1)`` (randomized; without
  randomization ``u = 1``).
* ``raps`` (regularized APS; Angelopoulos, Bates, Malik & Jordan 2021): APS plus
  ``λ · max(0, o(y) − k_reg)``, ``o(y)`` the 1-based rank of ``y``.

For a fixed ``u`` per example the APS/RAPS score grows with the rank, so every
set is a top-ranked prefix of the classes; a randomized set may be empty.

Regression (:func:`regression_scores`): ``s = |y − μ| / σ`` with the ensemble's
predictive mean and std, giving the interval ``μ ± q̂ σ`` (normalized residuals;
Papadopoulos et al. 2008, Lei et al. 2018).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["ALPHAS", "CLASS_SCORES", "RAPS_K_REG", "RAPS_LAMBDA", "class_scores",
           "conformal_quantile", "interval_metrics", "prediction_sets", "regression_scores",
           "set_metrics", "split_coverage", "split_interval_coverage"]

#: Miscoverage levels evaluated by default.
ALPHAS = (0.05, 0.1, 0.2)
CLASS_SCORES = ("lac", "aps", "raps")
#: RAPS defaults: λ and k_reg (Angelopoulos et al. 2021 tune them on a split; with 10
#: classes we regularize from the third class on).
RAPS_LAMBDA = 0.01
RAPS_K_REG = 2
#: Seed of the APS/RAPS uniform draws (a prediction set is reproducible).
RANDOM_SEED = 20_261_201


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    return float(alpha)


def conformal_quantile(scores: Tensor, alpha: float) -> float:
    """The split-conformal threshold: the ``⌈(n+1)(1−α)⌉``-th smallest of ``scores (n,)``.

    ``+inf`` when ``⌈(n+1)(1−α)⌉ > n`` (too few calibration examples for level α).
    """
    alpha = _check_alpha(alpha)
    s = scores.detach().to(torch.float64).reshape(-1)
    n = s.numel()
    if n == 0:
        raise ValueError("conformal calibration needs at least one score")
    if bool(torch.isnan(s).any()):
        raise ValueError("calibration scores contain NaN")
    k = math.ceil((n + 1) * (1 - alpha) - 1e-12)
    if k > n:
        return math.inf
    return float(torch.sort(s).values[k - 1])


def uniform_draws(n: int, seed: int = RANDOM_SEED) -> Tensor:
    """``n`` seeded U(0, 1) draws, float64 (the APS/RAPS randomization)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def class_scores(probs: Tensor, score: str = "aps", u: Tensor | None = None,
                 lam: float = RAPS_LAMBDA, k_reg: int = RAPS_K_REG,
                 randomized: bool = True) -> Tensor:
    """Nonconformity ``s(x_n, c)`` of every class: ``(N, C)`` float64.

    Args:
        probs: the predictive ``p̄ (N, C)`` (rows sum to 1).
        score: ``"lac"``, ``"aps"`` or ``"raps"``.
        u: ``(N,)`` U(0, 1) draws of the randomized APS/RAPS (default: seeded
            :func:`uniform_draws`); ignored by LAC and when not ``randomized``.
        lam, k_reg: RAPS penalty ``λ · max(0, rank − k_reg)``.
        randomized: APS/RAPS with ``u`` (exact coverage) or ``u = 1`` (conservative).
    """
    if score not in CLASS_SCORES:
        raise ValueError(f"unknown conformal score {score!r}; allowed: {', '.join(CLASS_SCORES)}")
    if not isinstance(probs, Tensor) or probs.dim() != 2:
        raise ValueError("probs must be the predictive distribution (N, C)")
    p = probs.detach().to(torch.float64)
    if score == "lac":
        return 1.0 - p
    n, c = p.shape
    order = torch.sort(p, dim=1, descending=True, stable=True).indices
    sorted_p = p.gather(1, order)
    before = torch.cumsum(sorted_p, 1) - sorted_p  # mass ranked above each position
    if randomized:
        draw = uniform_draws(n) if u is None else u.detach().to(torch.float64)
        own = draw[:, None] * sorted_p
    else:
        own = sorted_p
    by_rank = before + own
    if score == "raps":
        if lam < 0 or k_reg < 0:
            raise ValueError(f"RAPS needs lambda >= 0 and k_reg >= 0, got {lam}, {k_reg}")
        rank = torch.arange(1, c + 1, dtype=torch.float64)
        by_rank = by_rank + lam * (rank - k_reg).clamp_min(0)
    return torch.empty_like(by_rank).scatter_(1, order, by_rank)


def label_scores(scores: Tensor, labels: Tensor) -> Tensor:
    """The calibration scores ``s(x_n, y_n)`` ``(N,)`` from ``(N, C)`` class scores."""
    return scores.gather(1, labels.to(torch.int64)[:, None]).squeeze(1)


def prediction_sets(scores: Tensor, threshold: float) -> Tensor:
    """``(N, C)`` bool: class ``c`` is in the set of example ``n`` iff ``s(x_n, c) ≤ q̂``."""
    return scores <= threshold


def set_metrics(sets: Tensor, labels: Tensor, num_classes: int | None = None
                ) -> dict[str, object]:
    """Coverage and size of prediction sets ``(N, C)`` bool against ``labels (N,)``.

    Returns ``coverage`` (fraction of sets holding the label), ``mean_size``,
    ``empty`` (fraction of empty sets), ``class_coverage`` (per true class;
    ``None`` for a class absent from ``labels``), ``worst_class_coverage`` (the
    minimum over the classes present) and ``size_counts`` (sets of size 0..C).
    """
    c = sets.shape[1] if num_classes is None else num_classes
    y = labels.to(torch.int64)
    covered = sets.gather(1, y[:, None]).squeeze(1).to(torch.float64)
    size = sets.sum(1)
    per_class: list[float | None] = []
    for k in range(c):
        mask = y == k
        per_class.append(float(covered[mask].mean()) if bool(mask.any()) else None)
    present = [v for v in per_class if v is not None]
    return {"coverage": float(covered.mean()), "mean_size": float(size.double().mean()),
            "empty": float((size == 0).double().mean()), "class_coverage": per_class,
            "worst_class_coverage": min(present) if present else float("nan"),
            "size_counts": torch.bincount(size, minlength=c + 1).tolist()}


def regression_scores(mean: Tensor, std: Tensor, targets: Tensor) -> Tensor:
    """Normalized residuals ``|y − μ| / σ`` ``(N,)`` (flattened over output dims)."""
    mu, sd, y = (t.detach().to(torch.float64).reshape(-1) for t in (mean, std, targets))
    if not bool((sd > 0).all()):
        raise ValueError("predictive stds must be > 0")
    return (y - mu).abs() / sd


def interval_metrics(mean: Tensor, std: Tensor, targets: Tensor, threshold: float
                     ) -> dict[str, float]:
    """Coverage and mean width of the intervals ``μ ± q̂ σ``."""
    residual = regression_scores(mean, std, targets)
    width = 2 * threshold * std.detach().to(torch.float64).reshape(-1)
    return {"coverage": float((residual <= threshold).double().mean()),
            "mean_width": float(width.mean())}


def random_splits(n: int, splits: int, calibration_fraction: float, seed: int
                  ) -> Iterator[tuple[Tensor, Tensor]]:
    """``splits`` seeded random (calibration, test) index splits of ``range(n)``."""
    generator = torch.Generator().manual_seed(seed)
    n_cal = int(round(calibration_fraction * n))
    for _ in range(splits):
        order = torch.randperm(n, generator=generator)
        yield order[:n_cal], order[n_cal:]


def split_coverage(probs: Tensor, labels: Tensor, alpha: float, splits: int = 20,
                   calibration_fraction: float = 0.5, seed: int = 0,
                   scores: Sequence[str] = CLASS_SCORES, lam: float = RAPS_LAMBDA,
                   k_reg: int = RAPS_K_REG) -> dict[str, dict[str, list[float]]]:
    """Coverage over random calibration/test splits of one labelled set.

    For each of ``splits`` seeded permutations, the first ``calibration_fraction`` of
    the examples calibrate and the rest are tested. The randomization ``u`` is drawn
    once per example (seeded), so both halves use independent draws. Returns
    ``{score: {"coverage": [splits], "mean_size": [...], "worst_class_coverage": [...]}}``.
    """
    alpha = _check_alpha(alpha)
    p = probs.detach().to(torch.float64)
    n = p.shape[0]
    u = uniform_draws(n, seed + RANDOM_SEED)
    table = {name: class_scores(p, name, u, lam, k_reg) for name in scores}
    out: dict[str, dict[str, list[float]]] = {
        name: {"coverage": [], "mean_size": [], "worst_class_coverage": []} for name in scores}
    for cal, test in random_splits(n, splits, calibration_fraction, seed):
        for name, s in table.items():
            q = conformal_quantile(label_scores(s[cal], labels[cal]), alpha)
            figures = set_metrics(prediction_sets(s[test], q), labels[test], p.shape[1])
            for key in out[name]:
                out[name][key].append(float(figures[key]))
    return out


def split_interval_coverage(mean: Tensor, std: Tensor, targets: Tensor, alpha: float,
                            splits: int = 20, calibration_fraction: float = 0.5,
                            seed: int = 0) -> dict[str, list[float]]:
    """Regression: coverage and width of ``μ ± q̂ σ`` over random calibration/test splits.

    ``mean``, ``std`` and ``targets`` ``(N,)`` or ``(N, D)`` (the predictive mean and
    std of the ensemble). Returns ``{"coverage": [splits], "mean_width": [...]}``.
    """
    alpha = _check_alpha(alpha)
    mu, sd, y = (t.detach().to(torch.float64).reshape(len(t), -1) for t in (mean, std, targets))
    n = len(mu)
    out: dict[str, list[float]] = {"coverage": [], "mean_width": []}
    for cal, test in random_splits(n, splits, calibration_fraction, seed):
        q = conformal_quantile(regression_scores(mu[cal], sd[cal], y[cal]), alpha)
        figures = interval_metrics(mu[test], sd[test], y[test], q)
        for key in out:
            out[key].append(figures[key])
    return out
