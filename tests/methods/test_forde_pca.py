"""FoRDE-PCA lengthscales against the authors' recipe (issue 15, REFERENCES §2).

AaltoPML/FoRDE ``calculate_pca.py``: X (N, D) = per-channel-normalized training
images, ``empcov = XᵀX / (N − 1)`` (uncentred), ``U, S = svd(empcov)``,
lengthscales ``sqrt(S)``. ``train_forde.py``: project s on U, normalize
ŝ = s / sqrt(‖s‖² + eps), scale coordinate d by sqrt(S_d). Recomputed here in
NumPy float64 and compared with ours to 1e-10.
"""

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from diverse.app.config import load_config
from diverse.data.datasets import DataConfig, Dataset, load_dataset
from diverse.errors import UserError
from diverse.methods.base import Step, TrainingData
from diverse.methods.forde import FoRDEConfig, build_forde
from diverse.methods.spaces import pca_lengthscales
from diverse.nets.ensemble import Ensemble
from diverse.nets.likelihoods import Categorical
from diverse.nets.models import MLPConfig, build_model

TOL = 1e-10
SHAPE = (1, 6, 6)


def images(n=200, seed=0):
    """Correlated pixels in [0, 1] with a non-zero mean image, normalized per channel."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(SHAPE))
    mean_image = rng.uniform(0.2, 0.8, d)
    mix = rng.normal(size=(d, d)) * rng.uniform(0.005, 0.05, d)
    raw = np.clip(mean_image + rng.normal(size=(n, d)) @ mix.T, 0.0, 1.0).reshape(n, *SHAPE)
    mu = raw.mean(axis=(0, 2, 3), keepdims=True)
    sd = raw.std(axis=(0, 2, 3), keepdims=True)
    return (raw - mu) / sd  # the data set's per-channel mean/std, as calculate_pca.py


def hand_matrix(x, form):
    """The (D, D) matrix of each form, by hand in NumPy float64."""
    x = x.reshape(len(x), -1)
    if form == "reference":
        return x.T @ x / (len(x) - 1)  # calculate_pca.py: empcov, uncentred
    xc = x - x.mean(0)
    cov = xc.T @ xc / (len(x) - 1)
    if form == "covariance":
        return cov
    return np.corrcoef(x, rowvar=False)


def hand_pca(x, form="reference"):
    u, s, _ = np.linalg.svd(hand_matrix(x, form))  # calculate_pca.py: U, S = svd(empcov)
    return u, np.sqrt(s)


@pytest.mark.parametrize("form", ["reference", "covariance", "correlation"])
def test_lengthscales_and_basis_equal_the_hand_recipe(form):
    x = images()
    u, ls = hand_pca(x, form)
    ours = pca_lengthscales(torch.from_numpy(x), alpha=1.0, form=form)
    assert ours.basis.dtype == torch.float64
    basis, scale = ours.basis.numpy(), ours.scale.numpy()
    np.testing.assert_allclose(scale, ls, rtol=0, atol=TOL)  # both decreasing
    # sign-invariant: U diag(S) Uᵀ is the matrix itself; columns match up to sign
    np.testing.assert_allclose(basis @ np.diag(scale**2) @ basis.T, hand_matrix(x, form),
                               rtol=0, atol=TOL)
    np.testing.assert_allclose(np.abs(np.sum(basis * u, 0)), np.ones(len(ls)), rtol=0, atol=1e-8)
    np.testing.assert_allclose(basis.T @ basis, np.eye(len(ls)), rtol=0, atol=TOL)


def test_the_three_forms_differ_and_reference_has_the_mean_image_on_top():
    x = images()
    top = {f: pca_lengthscales(torch.from_numpy(x), form=f) for f in
           ("reference", "covariance", "correlation")}
    lam = {f: float(m.scale[0]) ** 2 for f, m in top.items()}
    assert lam["reference"] > 1.2 * lam["covariance"]
    assert abs(lam["covariance"] - lam["correlation"]) > 0.05 * lam["correlation"]
    mean_dir = x.reshape(len(x), -1).mean(0)
    mean_dir /= np.linalg.norm(mean_dir)
    cos = abs(float(top["reference"].basis[:, 0].numpy() @ mean_dir))
    assert cos > 0.9, cos
    # the correlation matrix has a unit diagonal, the reference one does not
    b, s = top["correlation"].basis.numpy(), top["correlation"].scale.numpy()
    np.testing.assert_allclose(np.diag(b @ np.diag(s**2) @ b.T), 1.0, atol=TOL)


def test_alpha_mixes_identity_and_lengthscales():
    x = images()
    _, ls = hand_pca(x)
    half = pca_lengthscales(torch.from_numpy(x), alpha=0.5, form="reference")
    np.testing.assert_allclose(half.scale.numpy(), np.sqrt(0.5 + 0.5 * ls**2), atol=TOL)


def test_chunked_accumulation_matches_one_block():
    x = torch.from_numpy(images())
    one = pca_lengthscales(x, form="covariance", chunk=10_000)
    many = pca_lengthscales(x, form="covariance", chunk=7)
    torch.testing.assert_close(many.scale, one.scale, rtol=0, atol=TOL)


def tiny_problem(m=3, b=16, seed=0):
    x = images()
    data = Dataset("toy", "classification", torch.from_numpy(x),
                   torch.from_numpy(np.arange(len(x)) % 3), torch.from_numpy(x[:20]),
                   torch.zeros(20, dtype=torch.long), 3, {}, (0.0,), (1.0,))
    ens = Ensemble(lambda: build_model(MLPConfig(hidden=(8,), activation="tanh"), SHAPE, 3), m,
                   seed=seed, execution="loop")
    ens.module.double()
    ens.params = {k: v.detach().double().requires_grad_(True) for k, v in ens.params.items()}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:b]
    return data, ens, data.x_train[idx], data.y_train[idx]


def hand_repulsion_grads(ens, xb, yb, u, ls, eps):
    """(1/B) Σ_i log Σ_j k_ij, written out in the order of train_forde.py."""
    params = ens.params
    u, ls = torch.from_numpy(u), torch.from_numpy(ls)
    emb = []
    for i in range(ens.members):
        xi = xb.clone().requires_grad_(True)
        out = functional_call(ens.module, {k: v[i] for k, v in params.items()}, (xi,))
        (s,) = torch.autograd.grad(out.gather(1, yb[:, None]).sum(), xi, create_graph=True)
        p = s.reshape(len(xb), -1) @ u  # project on U
        p = p / torch.sqrt(p.square().sum(-1, keepdim=True) + eps)  # normalize
        emb.append(p * ls)  # scale coordinate d by sqrt(λ_d)
    e = torch.stack(emb, 1)  # (B, M, D)
    sq = (e[:, :, None, :] - e.detach()[:, None, :, :]).square().sum(-1)  # (B, i, j)
    h = torch.quantile(sq.detach(), 0.5, dim=1, keepdim=True) / math.log(ens.members) + 1e-12
    k = torch.exp(-sq / h).mean(0)
    loss = k.sum(1).log().sum() / len(xb)
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    # the output bias does not move input gradients: no repulsion on it
    return {n: torch.zeros_like(params[n]) if g is None else g
            for n, g in zip(names, grads, strict=True)}


def our_grads(cfg, data, ens, xb, yb):
    step = Step(ens, xb, yb, Categorical(), len(data.x_train), 0.0, 0.3)
    return build_forde(cfg, TrainingData.of(data))(step).grads  # driving_scale = 0: repulsion only


@pytest.mark.parametrize("eps", [1e-12, 0.5])
def test_repulsion_gradient_equals_hand_recipe(eps):
    data, ens, xb, yb = tiny_problem()
    u, ls = hand_pca(data.x_train.numpy())
    want = hand_repulsion_grads(ens, xb, yb, u, ls, eps)
    got = our_grads(FoRDEConfig(driving_scale=0.0, eps=eps), data, ens, xb, yb)
    assert set(got) == set(want)
    assert flat(want).abs().max() > 1e-3  # the test compares something non-trivial
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=TOL)


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def test_eps_and_form_change_the_gradient():
    data, ens, xb, yb = tiny_problem()
    ref = flat(our_grads(FoRDEConfig(driving_scale=0.0), data, ens, xb, yb))
    big_eps = flat(our_grads(FoRDEConfig(driving_scale=0.0, eps=0.5), data, ens, xb, yb))
    assert (ref - big_eps).norm() > 0.3 * ref.norm()
    for form in ("covariance", "correlation"):
        other = flat(our_grads(FoRDEConfig(driving_scale=0.0, pca=form), data, ens, xb, yb))
        assert (ref - other).norm() > 0.3 * ref.norm(), form


def test_reference_on_the_pipeline_does_not_standardize_again():
    """``[data] normalize = true`` inputs go in unchanged: equal to the recipe on raw digits."""
    cfg = DataConfig(name="digits", train_subset=300)
    normalized = load_dataset(cfg).x_train
    raw = load_dataset(DataConfig(name="digits", train_subset=300, normalize=False))
    x = raw.x_train.double().numpy()
    x = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / x.std(axis=(0, 2, 3), keepdims=True)
    want = hand_matrix(x, "reference")
    ours = pca_lengthscales(normalized, form="reference")
    b, s = ours.basis.double().numpy(), ours.scale.double().numpy()
    got = b @ np.diag(s**2) @ b.T
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.abs(np.diag(want) - 1).max() > 0.5  # per-pixel moments are far from unit


def test_config_keys_and_defaults():
    base = ["method.name=forde", "data.name=digits"]
    cfg = load_config(None, base).method
    assert (cfg.pca, cfg.eps) == ("reference", 1e-12)
    cfg = load_config(None, [*base, "method.pca=covariance", "method.eps=1e-24"]).method
    assert (cfg.pca, cfg.eps) == ("covariance", 1e-24)


@pytest.mark.parametrize("bad, message", [
    ({"pca": "svd"}, "[method] pca = 'svd': allowed reference, covariance, correlation"),
    ({"eps": 0.0}, "[method] eps = 0.0: must be > 0"),
])
def test_bad_values_raise_one_line_errors(bad, message):
    data, _, _, _ = tiny_problem()
    with pytest.raises(UserError) as err:
        build_forde(FoRDEConfig(**bad), TrainingData.of(data))
    assert str(err.value) == message
    with pytest.raises(ValueError, match="allowed reference, covariance, correlation"):
        pca_lengthscales(data.x_train, form="svd")
