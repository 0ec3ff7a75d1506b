"""Distance to a reference posterior (diverse.evaluation.reference) against closed forms."""

import math

import numpy as np
import torch

from diverse.evaluation.reference import distance_table, input_regions, mixture_nll, wasserstein2_1d


def _w2_by_quantile_grid(a, b, grid=200_000):
    u = (np.arange(grid) + 0.5) / grid
    qa = np.sort(a)[np.minimum((u * len(a)).astype(int), len(a) - 1)]
    qb = np.sort(b)[np.minimum((u * len(b)).astype(int), len(b) - 1)]
    return math.sqrt(np.mean((qa - qb) ** 2))


def test_w2_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 40, generator=g, dtype=torch.float64)
    assert torch.allclose(wasserstein2_1d(a, a), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    # a shift by c moves every quantile by c
    torch.testing.assert_close(wasserstein2_1d(a, a + 0.7), torch.full((5,), 0.7,
                                                                       dtype=torch.float64))
    # equal sizes: the sorted samples are matched one to one
    b = torch.randn(5, 40, generator=g, dtype=torch.float64)
    direct = (a.sort(-1).values - b.sort(-1).values).square().mean(-1).sqrt()
    torch.testing.assert_close(wasserstein2_1d(a, b), direct)
    # by hand: {0, 1} vs {0, 0.5, 1}: quantiles 0|0 on [0,1/3], 0|0.5 on (1/3,1/2],
    # 1|0.5 on (1/2,2/3], 1|1 on (2/3,1]: W2² = 0.25/6 + 0.25/6
    w = wasserstein2_1d(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.5, 1.0]]))
    assert abs(float(w) - math.sqrt(0.5 / 6)) < 1e-12


def test_w2_unequal_sizes_against_a_quantile_grid():
    rng = np.random.default_rng(1)
    for s1, s2 in ((7, 13), (100, 37), (3, 250)):
        a, b = rng.normal(size=s1), rng.normal(0.3, 2.0, size=s2)
        ours = float(wasserstein2_1d(torch.from_numpy(a)[None], torch.from_numpy(b)[None]))
        assert abs(ours - _w2_by_quantile_grid(a, b)) < 1e-4


def test_regions_of_the_toy_grid():
    x = torch.linspace(0, 7, 15)
    train = torch.tensor([1.5, 2.0, 2.5, 4.5, 5.0, 6.0])
    masks = input_regions(x, train, far=0.5)
    assert torch.equal(masks["near"] | masks["gap"] | masks["extrapolation"],
                       torch.ones(15, dtype=torch.bool))
    assert not bool((masks["near"] & masks["gap"]).any())
    assert x[masks["gap"]].tolist() == [3.5]  # 3.0 and 4.0 are within 0.5 of the data
    assert set(x[masks["extrapolation"]].tolist()) == {0.0, 0.5, 7.0}


def test_mixture_nll_by_hand_and_distance_table():
    means = torch.tensor([[0.0, 1.0], [2.0, 1.0]], dtype=torch.float64)  # (S=2, N=2)
    stds = torch.ones(2, 2, dtype=torch.float64)
    targets = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    nll = mixture_nll(means, stds, targets)
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    assert abs(float(nll[0, 0]) + math.log(phi(1.0))) < 1e-12
    assert abs(float(nll[0, 1]) + math.log(phi(0.0))) < 1e-12
    g = torch.Generator().manual_seed(2)
    f_ref = torch.randn(400, 6, generator=g, dtype=torch.float64)
    f = 0.5 * torch.randn(300, 6, generator=g, dtype=torch.float64) + 0.2
    regions = {"near": torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool),
               "gap": torch.tensor([0, 0, 1, 1, 1, 1], dtype=torch.bool)}
    row = distance_table(f, f_ref, regions)
    std, std_ref = f.std(0, correction=0), f_ref.std(0, correction=0)
    assert abs(row["std_ratio_gap"] - float(std[2:].mean() / std_ref[2:].mean())) < 1e-12
    assert abs(row["mean_diff_near"]
               - float((f.mean(0) - f_ref.mean(0))[:2].abs().mean())) < 1e-12
    assert abs(row["w2"] - float(wasserstein2_1d(f.T, f_ref.T).mean())) < 1e-12
    assert 0.3 < row["std_ratio_gap"] < 0.7 and "extrapolation" not in str(row)
