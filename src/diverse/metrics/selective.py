"""Selective classification: risk–coverage curves and their areas, pure functions.

A selective classifier accepts the examples it is most confident about and
abstains on the rest. Given a per-example uncertainty ``u (N,)`` (higher =
rejected first; :mod:`diverse.math.confidence`) and the errors ``e (N,)`` of the
prediction (1 = wrong), sort the examples by ascending ``u`` and accept the
first ``k``, ``k = 1..N``:

* coverage ``c_k = k / N``;
* selective risk ``r_k = E_k / k`` with ``E_k`` the errors among the accepted;
* generalized risk ``g_k = E_k / N`` (the joint probability of being accepted and
  wrong; Traub et al. 2024, "Overcoming common flaws in the evaluation of
  selective classification systems").

Ties: examples with equal ``u`` are accepted in random order, and ``E_k`` is
its expectation — inside a tie group starting after position ``a`` with error
rate ``ρ``, ``E_k = E_a + (k − a) ρ`` — so the curve does not depend on how
ties happen to be ordered.

Areas (means over the N operating points, Geifman et al. 2019, "Bias-reduced
uncertainty estimation for deep neural classifiers"):

* ``AURC = (1/N) Σ_k r_k``;
* ``E-AURC = AURC − AURC*``, AURC* that of the oracle ranking that accepts all
  correct examples first (``E_k* = max(0, k − (N − n_err))``); 0 for a perfect ranking;
* ``AUGRC = (1/N) Σ_k g_k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["COVERAGES", "accuracy_at_coverage", "aurc", "augrc", "e_aurc", "oracle_aurc",
           "risk_coverage", "selective_metrics"]

#: Coverages of :func:`selective_metrics`'s ``accuracy_at_<c>`` figures.
COVERAGES = (0.5, 0.8, 0.9, 0.95)


def _check(uncertainty: Tensor, errors: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(uncertainty, Tensor) or uncertainty.dim() != 1:
        raise ValueError("uncertainty must be a 1-d tensor (N,)")
    if not isinstance(errors, Tensor) or errors.shape != uncertainty.shape:
        raise ValueError(f"errors must have the shape of uncertainty {tuple(uncertainty.shape)}")
    u = uncertainty.detach().to(torch.float64)
    if bool(torch.isnan(u).any()):
        raise ValueError("uncertainty contains NaN")
    return u, _check_errors(errors)


def _check_errors(errors: Tensor) -> Tensor:
    if not isinstance(errors, Tensor) or errors.dim() != 1:
        raise ValueError("errors must be a 1-d tensor (N,) of 0 (correct) / 1 (wrong)")
    if errors.shape[0] == 0:
        raise ValueError("selective metrics need at least one example (N = 0)")
    e = errors.detach().to(torch.float64)
    if bool(((e != 0) & (e != 1)).any()):  # NaN fails both comparisons too
        raise ValueError("errors must be 0 (correct) or 1 (wrong)")
    return e


def expected_errors(uncertainty: Tensor, errors: Tensor) -> Tensor:
    """``E_k`` for ``k = 1..N``: expected errors among the ``k`` least uncertain ``(N,)``.

    Ties in ``uncertainty`` are resolved in expectation over their order (see the
    module docstring).
    """
    u, e = _check(uncertainty, errors)
    u_sorted, order = torch.sort(u, stable=True)
    e_sorted = e[order]
    n = len(u)
    # tie groups of the sorted uncertainties: group id per position, group start and size
    new_group = torch.ones(n, dtype=torch.bool, device=u.device)
    new_group[1:] = u_sorted[1:] != u_sorted[:-1]
    group = new_group.cumsum(0) - 1
    starts = torch.nonzero(new_group).squeeze(1)
    sizes = torch.diff(torch.cat([starts, starts.new_tensor([n])]))
    group_errors = torch.zeros(len(starts), dtype=torch.float64, device=u.device)
    group_errors.scatter_add_(0, group, e_sorted)
    before = torch.cumsum(group_errors, 0) - group_errors  # errors of the earlier groups
    position = torch.arange(1, n + 1, dtype=torch.float64, device=u.device)
    inside = position - starts[group].to(torch.float64)  # how many of the group are accepted
    return before[group] + inside * group_errors[group] / sizes[group].to(torch.float64)


def risk_coverage(uncertainty: Tensor, errors: Tensor) -> dict[str, Tensor]:
    """The risk–coverage curve: ``{"coverage", "risk", "generalized_risk"}``, each ``(N,)``.

    Args:
        uncertainty: ``(N,)``, higher = rejected first.
        errors: ``(N,)`` 0/1 (bool or numeric), 1 where the prediction is wrong.
    """
    expected = expected_errors(uncertainty, errors)
    n = len(expected)
    k = torch.arange(1, n + 1, dtype=torch.float64, device=expected.device)
    return {"coverage": k / n, "risk": expected / k, "generalized_risk": expected / n}


def aurc(uncertainty: Tensor, errors: Tensor) -> float:
    """Area under the risk–coverage curve, ``(1/N) Σ_k E_k / k``."""
    return float(risk_coverage(uncertainty, errors)["risk"].mean())


def oracle_aurc(errors: Tensor) -> float:
    """AURC of the ranking that accepts every correct example first."""
    e = _check_errors(errors)
    n, wrong = len(e), float(e.sum())
    k = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((k - (n - wrong)).clamp_min(0) / k).mean())


def e_aurc(uncertainty: Tensor, errors: Tensor) -> float:
    """Excess AURC, ``AURC − AURC*`` (≥ 0; 0 for a perfect ranking)."""
    return aurc(uncertainty, errors) - oracle_aurc(errors)


def augrc(uncertainty: Tensor, errors: Tensor) -> float:
    """Area under the generalized risk–coverage curve, ``(1/N) Σ_k E_k / N``."""
    return float(risk_coverage(uncertainty, errors)["generalized_risk"].mean())


def accuracy_at_coverage(uncertainty: Tensor, errors: Tensor, coverage: float) -> float:
    """Accuracy on the ``k = ⌈coverage · N⌉`` least uncertain examples (``1 − E_k / k``)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    expected = expected_errors(uncertainty, errors)
    k = max(1, math.ceil(coverage * len(expected) - 1e-9))
    return 1.0 - float(expected[k - 1]) / k


def selective_metrics(uncertainty: Tensor, errors: Tensor,
                      coverages: Sequence[float] = COVERAGES) -> dict[str, float]:
    """``{"aurc", "e_aurc", "augrc", "accuracy_at_<100c>" ...}`` as Python floats."""
    curve = risk_coverage(uncertainty, errors)
    expected = curve["risk"] * torch.arange(1, len(curve["risk"]) + 1, dtype=torch.float64)
    area = float(curve["risk"].mean())
    out = {"aurc": area, "e_aurc": area - oracle_aurc(errors),
           "augrc": float(curve["generalized_risk"].mean())}
    for c in coverages:
        k = max(1, math.ceil(c * len(expected) - 1e-9))
        out[f"accuracy_at_{round(100 * c)}"] = 1.0 - float(expected[k - 1]) / k
    return out
