"""Tests for diverse.math.confidence: every score against direct NumPy loops, closed forms, OOD
AUROC / AUPR against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from diverse import metrics as mt
from diverse.math import confidence as cf

# ----------------------------------------------------------------------- references


def np_entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(scipy.special.xlogy(p, p), axis=-1)


def ref_scores(probs: np.ndarray, logits: np.ndarray | None,
               logp: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every score by direct NumPy (explicit loops over sample pairs)."""
    s, n, _ = probs.shape
    if logp is None:
        logp = np.log(probs)
    pbar = probs.mean(0)
    out = {
        "msp": -pbar.max(-1),
        "entropy": np_entropy(pbar),
        "mutual_information": np_entropy(pbar) - np.mean([np_entropy(probs[i]) for i in range(s)],
                                                         axis=0),
    }
    votes = probs.argmax(-1)  # (S, N)
    vr = np.zeros(n)
    kl = np.zeros(n)
    dis = np.zeros(n)
    for j in range(n):
        counts = np.bincount(votes[:, j])
        vr[j] = 1.0 - counts.max() / s
        if s > 1:
            total_kl, total_dis = 0.0, 0.0
            for a in range(s):
                for b in range(s):
                    if a == b:
                        continue
                    total_kl += float(np.sum(probs[a, j] * (logp[a, j] - logp[b, j])))
                    total_dis += float(votes[a, j] != votes[b, j])
            kl[j] = total_kl / (s * (s - 1))
            dis[j] = total_dis / (s * (s - 1))
    out.update(variation_ratio=vr, pairwise_kl=kl, disagreement=dis)
    if logits is not None:
        out["max_logit"] = -logits.mean(0).max(-1)
        out["energy"] = np.mean([-scipy.special.logsumexp(logits[i], axis=-1) for i in range(s)],
                                axis=0)
    return out


def random_ensemble(seed: int, s: int, n: int, c: int, scale: float = 2.0, spread: float = 1.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(1, n, c)) * scale
    logits = base + spread * rng.normal(size=(s, n, c))
    return scipy.special.softmax(logits, -1), logits


def t64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


# ----------------------------------------------------------------- random agreement


@pytest.mark.parametrize("s,n,c", [(1, 9, 3), (2, 17, 2), (5, 40, 10), (8, 25, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_score_matches_numpy_with_logits(s, n, c, seed):
    probs, logits = random_ensemble(seed, s, n, c)
    ref = ref_scores(probs, logits, scipy.special.log_softmax(logits, -1))
    got = cf.uncertainty_scores(t64(probs), t64(logits))
    assert set(got) == set(cf.SCORES) == set(ref)
    for name in cf.SCORES:
        assert got[name].dtype == torch.float64 and got[name].shape == (n,), name
        np.testing.assert_allclose(got[name].numpy(), ref[name], rtol=0, atol=1e-10,
                                   err_msg=name)
        # each entry of SCORES on its own gives the same
        np.testing.assert_allclose(cf.SCORES[name](t64(probs), t64(logits)).numpy(), ref[name],
                                   rtol=0, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("s,n,c", [(3, 30, 5), (6, 20, 7)])
def test_scores_without_logits_match_numpy(s, n, c):
    probs, _ = random_ensemble(7, s, n, c)
    ref = ref_scores(probs, None)
    got = cf.uncertainty_scores(t64(probs))
    assert set(got) == set(cf.SCORES) - set(cf.LOGIT_SCORES)
    for name, value in got.items():
        np.testing.assert_allclose(value.numpy(), ref[name], rtol=0, atol=1e-10, err_msg=name)


def test_named_functions_match_numpy():
    probs, logits = random_ensemble(3, 4, 15, 6)
    ref = ref_scores(probs, logits, scipy.special.log_softmax(logits, -1))
    np.testing.assert_allclose(cf.msp(t64(probs)).numpy(), ref["msp"], atol=1e-12)
    np.testing.assert_allclose(cf.max_logit(t64(logits)).numpy(), ref["max_logit"], atol=1e-12)
    np.testing.assert_allclose(cf.energy(t64(logits)).numpy(), ref["energy"], atol=1e-12)
    np.testing.assert_allclose(cf.variation_ratio(t64(probs)).numpy(), ref["variation_ratio"],
                               atol=1e-15)
    np.testing.assert_allclose(cf.pairwise_kl(t64(probs), t64(logits)).numpy(),
                               ref["pairwise_kl"], atol=1e-10)
    np.testing.assert_allclose(cf.pairwise_kl(t64(probs)).numpy(), ref["pairwise_kl"],
                               atol=1e-10)
    # float32 inputs are promoted to float64
    assert cf.energy(torch.tensor(logits, dtype=torch.float32)).dtype == torch.float64


def test_variation_ratio_by_hand():
    # 5 members, argmax votes per example: [0,0,1,2,0] -> 1 - 3/5; [1,1,1,1,1] -> 0;
    # [0,1,2,3,3] -> 1 - 2/5
    votes = np.array([[0, 1, 0], [0, 1, 1], [1, 1, 2], [2, 1, 3], [0, 1, 3]])
    probs = np.full((5, 3, 4), 0.1)
    for m in range(5):
        for j in range(3):
            probs[m, j, votes[m, j]] = 0.7
    np.testing.assert_allclose(cf.variation_ratio(t64(probs)).numpy(), [0.4, 0.0, 0.6],
                               atol=1e-15)
    # disagreement: sum_j c_j^2 = 9+1+1=11 -> (25-11)/20; 0; (25-(1+1+1+4))/20
    np.testing.assert_allclose(mt.disagreement(t64(probs)).numpy(), [14 / 20, 0.0, 18 / 20],
                               atol=1e-15)


# --------------------------------------------------------------------- closed forms


def test_two_disagreeing_one_hot_members():
    probs = t64([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])  # (2, 1, 3)
    got = cf.uncertainty_scores(probs)
    assert float(got["mutual_information"][0]) == pytest.approx(math.log(2), abs=1e-12)
    assert float(got["entropy"][0]) == pytest.approx(math.log(2), abs=1e-12)
    assert float(got["variation_ratio"][0]) == pytest.approx(0.5, abs=1e-15)
    assert float(got["disagreement"][0]) == pytest.approx(1.0, abs=1e-15)
    assert float(got["msp"][0]) == pytest.approx(-0.5, abs=1e-15)


def test_two_members_kl_closed_form():
    # KL(p||q) + KL(q||p) for p=(a,1-a), q=(b,1-b), mean over the 2 ordered pairs
    a, b = 0.8, 0.3
    probs = t64([[[a, 1 - a]], [[b, 1 - b]]])
    kl_pq = a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    kl_qp = b * math.log(b / a) + (1 - b) * math.log((1 - b) / (1 - a))
    assert float(cf.pairwise_kl(probs)[0]) == pytest.approx((kl_pq + kl_qp) / 2, abs=1e-13)
    logits = probs.log() + 1.7  # any shift gives the same log-softmax
    assert float(cf.pairwise_kl(probs, logits)[0]) == pytest.approx((kl_pq + kl_qp) / 2,
                                                                    abs=1e-13)


@pytest.mark.parametrize("one_hot", [False, True])
def test_identical_members_have_zero_disagreement_scores(one_hot):
    rng = np.random.default_rng(4)
    if one_hot:
        p = np.eye(5)[rng.integers(0, 5, size=12)]
    else:
        p = scipy.special.softmax(rng.normal(size=(12, 5)) * 3, -1)
    probs = t64(np.repeat(p[None], 4, axis=0))
    got = cf.uncertainty_scores(probs)
    for name in ("mutual_information", "variation_ratio", "pairwise_kl", "disagreement"):
        np.testing.assert_allclose(got[name].numpy(), 0.0, rtol=0, atol=1e-12, err_msg=name)
        assert bool((got[name] >= 0).all()), name
    if not one_hot:
        logits = t64(np.log(np.repeat(p[None], 4, axis=0)))
        np.testing.assert_allclose(cf.pairwise_kl(probs, logits).numpy(), 0.0, atol=1e-12)


def test_single_sample_gives_zero_disagreement_scores():
    probs, logits = random_ensemble(9, 1, 20, 6, spread=0.0)
    got = cf.uncertainty_scores(t64(probs), t64(logits))
    for name in ("mutual_information", "variation_ratio", "pairwise_kl", "disagreement"):
        assert bool((got[name] == 0).all()), name
    # and the others reduce to the single model's
    np.testing.assert_allclose(got["msp"].numpy(), -probs[0].max(-1), atol=1e-15)
    np.testing.assert_allclose(got["max_logit"].numpy(), -logits[0].max(-1), atol=1e-15)
    np.testing.assert_allclose(got["energy"].numpy(),
                               -scipy.special.logsumexp(logits[0], -1), atol=1e-12)


def test_uniform_prediction_closed_forms():
    c = 7
    logits = t64(np.zeros((3, 2, c)))
    probs = torch.softmax(logits, -1)
    got = cf.uncertainty_scores(probs, logits)
    np.testing.assert_allclose(got["entropy"].numpy(), math.log(c), atol=1e-12)
    np.testing.assert_allclose(got["msp"].numpy(), -1 / c, atol=1e-15)
    np.testing.assert_allclose(got["energy"].numpy(), -math.log(c), atol=1e-12)
    np.testing.assert_allclose(got["max_logit"].numpy(), 0.0, atol=1e-15)


# --------------------------------------------------------------- selection / errors


def test_names_subset_and_order():
    probs, logits = random_ensemble(2, 3, 8, 4)
    got = cf.uncertainty_scores(t64(probs), t64(logits), names=("energy", "msp"))
    assert list(got) == ["energy", "msp"]
    got = cf.uncertainty_scores(t64(probs), names=("entropy",))
    assert list(got) == ["entropy"]


@pytest.mark.parametrize("name", ["max_logit", "energy"])
def test_logit_score_without_logits_raises(name):
    probs, _ = random_ensemble(2, 3, 8, 4)
    with pytest.raises(ValueError, match="logits"):
        cf.uncertainty_scores(t64(probs), names=(name,))
    with pytest.raises(ValueError):
        cf.uncertainty_scores(t64(probs), names=("msp", name))


def test_unknown_score_raises():
    probs, logits = random_ensemble(2, 3, 8, 4)
    with pytest.raises(ValueError, match="unknown"):
        cf.uncertainty_scores(t64(probs), t64(logits), names=("confidence",))
    with pytest.raises(ValueError):
        cf.uncertainty_scores(t64(probs), names=("msp", "nope"))


def test_bad_logits_and_probs_raise():
    probs, logits = random_ensemble(2, 3, 8, 4)
    with pytest.raises(ValueError):
        cf.uncertainty_scores(t64(probs), t64(logits[:, :4]))
    bad = logits.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        cf.uncertainty_scores(t64(probs), t64(bad))
    with pytest.raises(ValueError):
        cf.pairwise_kl(t64(probs), t64(logits[0]))
    with pytest.raises(ValueError):
        cf.uncertainty_scores(t64(logits))  # logits passed as probabilities
    with pytest.raises(ValueError):
        cf.uncertainty_scores(t64(probs[0]))  # (N, C)


# -------------------------------------------------------------------- OOD vs sklearn


def ood_ensembles(seed: int, s: int = 5, n_in: int = 300, n_out: int = 200, c: int = 10):
    """In-distribution: peaked, mostly agreeing members; OOD: flatter, more diverse ones."""
    rng = np.random.default_rng(seed)
    base_in = rng.normal(size=(1, n_in, c)) * 1.0
    base_in[0, np.arange(n_in), rng.integers(0, c, n_in)] += 4.0
    z_in = base_in + 0.5 * rng.normal(size=(s, n_in, c))
    z_out = rng.normal(size=(1, n_out, c)) * 0.7 + 1.2 * rng.normal(size=(s, n_out, c))
    return (scipy.special.softmax(z_in, -1), z_in), (scipy.special.softmax(z_out, -1), z_out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ood_auroc_and_aupr_match_sklearn_for_every_score(seed):
    (p_in, z_in), (p_out, z_out) = ood_ensembles(seed)
    s_in = cf.uncertainty_scores(t64(p_in), t64(z_in))
    s_out = cf.uncertainty_scores(t64(p_out), t64(z_out))
    assert set(s_in) == set(cf.SCORES)
    label = np.r_[np.zeros(len(p_in[0])), np.ones(len(p_out[0]))]
    for name in cf.SCORES:
        scores = np.r_[s_in[name].numpy(), s_out[name].numpy()]
        got = mt.ood_detection(s_in[name], s_out[name])
        assert got["auroc"] == pytest.approx(roc_auc_score(label, scores), abs=1e-9), name
        assert got["aupr_out"] == pytest.approx(average_precision_score(label, scores),
                                                abs=1e-9), name
        assert got["aupr_in"] == pytest.approx(average_precision_score(1 - label, -scores),
                                               abs=1e-9), name
        fpr, tpr, _ = roc_curve(label, scores, drop_intermediate=False)
        assert got["fpr95"] == pytest.approx(float(fpr[tpr >= 0.95][0]), abs=1e-12), name
        # the synthetic OOD data is detectable by every score (the test is not vacuous)
        assert got["auroc"] > 0.6, name


def test_ood_with_heavily_tied_discrete_scores_matches_sklearn():
    # few members -> variation ratio and disagreement take 2-3 values: many in/out ties
    (p_in, z_in), (p_out, z_out) = ood_ensembles(5, s=3, n_in=80, n_out=60, c=3)
    for name in ("variation_ratio", "disagreement"):
        si = cf.SCORES[name](t64(p_in), t64(z_in))
        so = cf.SCORES[name](t64(p_out), t64(z_out))
        scores = np.r_[si.numpy(), so.numpy()]
        assert len(np.unique(scores)) <= 3
        label = np.r_[np.zeros(len(si)), np.ones(len(so))]
        got = mt.ood_detection(si, so)
        assert got["auroc"] == pytest.approx(roc_auc_score(label, scores), abs=1e-9), name
        assert got["aupr_out"] == pytest.approx(average_precision_score(label, scores),
                                                abs=1e-9), name
