"""Mutual learning of BNNs: config checks, the peer wrapper, the pure loss terms, the update's
gradient against a hand-written objective, the two-stage schedule, and learning."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call

from diverse.errors import UserError
from diverse.methods.base import Step
from diverse.methods.mutual import (
    HEAD,
    MutualBNNConfig,
    build_mutual_bnn,
    cosine_conditional_log_probs,
    feature_kl,
    mutual_kl,
    off_diagonal_mean,
    wrap_mutual_peer,
)
from diverse.nets.bayes import MeanFieldLinear, to_mean_field
from diverse.nets.ensemble import Ensemble
from diverse.nets.likelihoods import Categorical
from diverse.nets.models import MLP, CifarResNet, LeNet5


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("key, value", [
    ("temperature", 0.0), ("temperature", float("inf")), ("mutual_weight", -1.0),
    ("alpha", -0.1), ("beta", float("nan")), ("diversity_start", 1.5),
    ("diversity_start", -0.1), ("prior_std", 0.0), ("init_rho", float("inf")),
    ("kl_weight", -1.0), ("attention_dim", 0), ("attention_dim", 2.5),
    ("predict_samples", 0), ("feature_layers", ("",)), ("temperature", "3"),
])
def test_bad_config_values_raise_user_error(key, value):
    with pytest.raises(UserError, match=key):
        MutualBNNConfig(**{key: value})


def test_config_accepts_toml_lists():
    assert MutualBNNConfig(feature_layers=["act1"]).feature_layers == ("act1",)


# ------------------------------------------------------------------ peer wrapper
def test_wrapper_keeps_the_forward_and_names_and_adds_the_head():
    torch.manual_seed(0)
    model = MLP((5,), 3, (8, 6)).eval()
    peer = wrap_mutual_peer(MutualBNNConfig(init_rho=-30.0, attention_dim=4), model).eval()
    x = torch.randn(7, 5)
    with torch.no_grad():
        torch.testing.assert_close(peer(x), model(x), atol=1e-4, rtol=1e-4)
    names = [n for n, _ in peer.named_parameters()]
    assert names[:4] == ["fc1.weight_mu", "fc1.weight_rho", "fc1.bias_mu", "fc1.bias_rho"]
    head = getattr(peer, HEAD)
    assert head.layers == ("act1", "act2") and head.widths == (8, 6)
    assert all(n.startswith(HEAD + ".") for n in names[12:]) and len(names) == 12 + 2 * 2 + 6
    assert peer.feature_layers == ("act1", "act2")


@pytest.mark.parametrize("make, shape", [
    (lambda: LeNet5((1, 28, 28), 10), (1, 28, 28)),
    (lambda: CifarResNet(8, 3, 10, "batch", 8, 8), (3, 12, 12)),
])
def test_inferred_head_widths_equal_the_measured_feature_widths(make, shape):
    peer = wrap_mutual_peer(MutualBNNConfig(), make())
    head = getattr(peer, HEAD)
    captured = {}
    modules = dict(peer.named_modules())
    for name in head.layers:
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.shape[1]))
    peer(torch.randn(2, *shape))
    assert head.widths == tuple(captured[n] for n in head.layers)


def test_wrapper_rejects_unknown_feature_layers():
    with pytest.raises(UserError, match="nope"):
        wrap_mutual_peer(MutualBNNConfig(feature_layers=("nope",)), MLP((5,), 3, (8,)))


# ------------------------------------------------------------------ pure terms
def test_off_diagonal_mean_hand_case():
    m = torch.tensor([[9.0, 1.0, 2.0], [3.0, 9.0, 5.0], [7.0, 8.0, 9.0]])
    torch.testing.assert_close(off_diagonal_mean(m), torch.tensor([1.5, 4.0, 7.5]))


def test_mutual_kl_matches_scipy_per_pair():
    from scipy.special import rel_entr, softmax

    logits = torch.randn(3, 5, 4, dtype=torch.float64)
    got = mutual_kl(logits, 2.0).numpy()
    p = softmax(logits.numpy() / 2.0, axis=-1)
    for j in range(3):
        for k in range(3):
            want = np.mean([rel_entr(p[j, b], p[k, b]).sum() for b in range(5)])
            assert got[j, k] == pytest.approx(want, abs=1e-12)


def test_cosine_conditional_probabilities_hand_case():
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    p = cosine_conditional_log_probs(z, eps=0.0).exp()[0]
    # K: cos 0 → ½, cos −1 → 0; row b = 0: a = 1 has ½, a = 2 has 0
    torch.testing.assert_close(p[0, 1:], torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(p[1, [0, 2]], torch.tensor([0.5, 0.5], dtype=torch.float64))
    off = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close((p * off).sum(-1), torch.ones(3, dtype=torch.float64))


def test_feature_kl_matches_an_explicit_double_loop():
    z = torch.randn(3, 4, 5, dtype=torch.float64)
    got = feature_kl(z)
    u = z / z.norm(dim=-1, keepdim=True)
    k = 0.5 * (u @ u.mT + 1) + 1e-6
    for a_member in range(3):
        for b_member in range(3):
            total = 0.0
            for b in range(4):
                others = [a for a in range(4) if a != b]
                p = k[a_member, b, others] / k[a_member, b, others].sum()
                q = k[b_member, b, others] / k[b_member, b, others].sum()
                total += float((p * (p / q).log()).sum())
            assert got[a_member, b_member].item() == pytest.approx(total / 4, abs=1e-12)
    assert got.diagonal().abs().max() < 1e-12


# ------------------------------------------------------------------ the update
def _ensemble(cfg, members=3, execution="loop", hidden=(8, 6), seed=0):
    return Ensemble(lambda: wrap_mutual_peer(cfg, MLP((5,), 4, hidden)), members, seed=seed,
                    execution=execution)


def _batch(b=10):
    g = torch.Generator().manual_seed(5)
    return torch.randn(b, 5, generator=g), torch.randint(0, 4, (b,), generator=g)


def _hand_objective(ens, cfg, x, y, n_train, s):
    """The documented objective, written out per peer with torch.distributions and loops."""
    module, params = ens.module, ens.params
    head = getattr(module, HEAD)
    m_count = ens.members
    outs, fused = [], []
    for m in range(m_count):
        captured = {}
        hooks = [dict(module.named_modules())[n].register_forward_hook(
            lambda _mod, _inp, out, n=n, c=captured: c.__setitem__(n, out))
            for n in head.layers]
        p = {k: v[m] for k, v in params.items()}
        outs.append(functional_call(module, p, (x,)))
        for h in hooks:
            h.remove()
        tokens = torch.stack([captured[n] @ p[f"{HEAD}.proj.{i}.weight"].T
                              + p[f"{HEAD}.proj.{i}.bias"] for i, n in enumerate(head.layers)], 1)
        lin = {w: (p[f"{HEAD}.{w}.weight"], p[f"{HEAD}.{w}.bias"])
               for w in ("query", "key", "value")}
        q = tokens[:, -1] @ lin["query"][0].T + lin["query"][1]  # (B, d)
        keys = tokens @ lin["key"][0].T + lin["key"][1]  # (B, L, d)
        values = tokens @ lin["value"][0].T + lin["value"][1]
        attn = torch.softmax((keys * q[:, None]).sum(-1) / math.sqrt(cfg.attention_dim), dim=1)
        fused.append((attn[:, :, None] * values).sum(1))
    t = cfg.temperature
    mf = [k[:-3] for k in params if k.endswith("_mu")]
    dim = sum(params[f"{k}_mu"][0].numel() for k in mf)
    b = len(x)

    def cond(z):  # p(a|b), rows b, diagonal zero
        u = z / z.norm(dim=-1, keepdim=True)
        k = (0.5 * (u @ u.T + 1) + 1e-6) * (1 - torch.eye(b))
        return k / k.sum(1, keepdim=True)

    total = 0.0
    for k in range(m_count):
        nll = F.cross_entropy(outs[k], y)
        kl = sum(kl_divergence(Normal(params[f"{w}_mu"][k], F.softplus(params[f"{w}_rho"][k])),
                               Normal(0.0, cfg.prior_std)).sum() for w in mf) / n_train
        others = [j for j in range(m_count) if j != k]
        mutual = t * t * sum(F.kl_div(F.log_softmax(outs[k] / t, -1),
                                      F.softmax(outs[j].detach() / t, -1),
                                      reduction="batchmean") for j in others) / len(others)
        w2 = [sum((params[f"{w}_mu"][k] - params[f"{w}_mu"][j].detach()).square().sum()
                  + (F.softplus(params[f"{w}_rho"][k])
                     - F.softplus(params[f"{w}_rho"][j].detach())).square().sum() for w in mf)
              for j in others]
        d_param = sum(torch.log1p(v / dim) for v in w2) / len(others)
        pk = cond(fused[k])
        off = 1 - torch.eye(b)
        log_pk = torch.log(pk + (1 - off))  # log 1 = 0 on the masked diagonal
        d_feat = sum((off * pk * (log_pk - torch.log(cond(fused[j]).detach() + (1 - off))))
                     .sum() / b for j in others) / len(others)
        total = total + (nll + cfg.kl_weight * kl + cfg.mutual_weight * mutual
                         - s * (cfg.alpha * d_param + cfg.beta * d_feat))
    return total


def test_update_gradient_equals_autograd_of_the_hand_objective():
    cfg = MutualBNNConfig(temperature=2.0, mutual_weight=0.8, alpha=0.7, beta=2.0,
                          kl_weight=0.5, prior_std=0.9, init_rho=-2.0, attention_dim=5,
                          diversity_start=0.3)
    ens = _ensemble(cfg)
    x, y = _batch()
    torch.manual_seed(11)
    res = build_mutual_bnn(cfg)(Step(ens.train(), x, y, Categorical(), 200, 1.0, 0.6))
    torch.manual_seed(11)  # same member order and RNG use: the same weight-noise draws
    objective = _hand_objective(ens, cfg, x, y, 200, s=1.0)
    names = list(ens.params)
    want = torch.autograd.grad(objective, [ens.params[k] for k in names])
    for k, g in zip(names, want, strict=True):
        torch.testing.assert_close(res.grads[k], g, atol=1e-6, rtol=1e-4)
    assert float(res.loss.sum()) == pytest.approx(float(objective.detach()), rel=1e-5)
    assert res.outputs.shape == (3, 10, 4)
    assert set(res.logs) == {"nll", "kl", "mutual", "w2", "param_div", "feature_div",
                             "diversity_scale"}
    assert res.logs["feature_div"] > 0 and res.logs["param_div"] > 0
    assert res.logs["diversity_scale"] == 1.0


def _grads(cfg, progress, execution="loop"):
    ens = _ensemble(cfg, execution=execution)
    x, y = _batch()
    torch.manual_seed(3)
    return build_mutual_bnn(cfg)(Step(ens.train(), x, y, Categorical(), 100, 1.0, progress))


def _max_diff(a, b, prefix=""):
    return max(float((a.grads[k] - b.grads[k]).abs().max()) for k in a.grads
               if k.startswith(prefix))


def test_diversity_terms_are_off_before_diversity_start_and_on_after():
    cfg = MutualBNNConfig(diversity_start=0.5, init_rho=-3.0, attention_dim=8)
    plain = MutualBNNConfig(diversity_start=0.5, init_rho=-3.0, attention_dim=8,
                            alpha=0.0, beta=0.0)
    before, before_plain = _grads(cfg, 0.49), _grads(plain, 0.49)
    assert before.logs["diversity_scale"] == 0.0
    assert _max_diff(before, before_plain) == 0.0
    assert all(float(g.abs().max()) == 0.0 for k, g in before.grads.items()
               if k.startswith(HEAD))
    after, after_plain = _grads(cfg, 0.5), _grads(plain, 0.5)
    assert after.logs["diversity_scale"] == 1.0
    assert _max_diff(after, after_plain, HEAD) > 1e-6  # the head learns from D_feat
    assert _max_diff(after, after_plain, "fc1.weight_mu") > 1e-6  # the body is pushed too
    # the losses differ by exactly −α·D_param − β·D_feat (averaged over peers)
    shift = after.loss.mean() - after_plain.loss.mean()
    want = -(cfg.alpha * float(after.logs["param_div"])
             + cfg.beta * float(after.logs["feature_div"]))  # logs are 0-dim tensors
    assert float(shift) == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_vmap_and_loop_updates_agree_when_sigma_vanishes():
    cfg = MutualBNNConfig(init_rho=-30.0, diversity_start=0.0, attention_dim=8)
    a, b = _grads(cfg, 0.5, "vmap"), _grads(cfg, 0.5, "loop")
    for k in a.grads:
        scale = max(1e-3, float(b.grads[k].abs().max()))
        torch.testing.assert_close(a.grads[k] / scale, b.grads[k] / scale, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make, shape, first", [
    (lambda cfg: wrap_mutual_peer(cfg, LeNet5((1, 28, 28), 10)), (1, 28, 28), "features.conv1"),
    (lambda cfg: wrap_mutual_peer(cfg, CifarResNet(8, 3, 10, "batch", 8, 8)), (3, 12, 12),
     "conv1"),
])
def test_update_runs_on_conv_nets(make, shape, first):
    cfg = MutualBNNConfig(diversity_start=0.0, attention_dim=8)
    ens = Ensemble(lambda: make(cfg), 2, execution="loop")
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    res = build_mutual_bnn(cfg)(Step(ens.train(), x, y, Categorical(), 100, 1.0, 0.5))
    assert res.outputs.shape == (2, 4, 10)
    assert set(res.grads) == set(ens.params)
    assert all(torch.isfinite(g).all() for g in res.grads.values())
    assert float(res.grads[f"{first}.weight_rho"].abs().max()) > 0
    assert float(res.grads[f"{HEAD}.query.weight"].abs().max()) > 0


def test_update_rejects_single_peer_unwrapped_models_and_regression():
    cfg = MutualBNNConfig()
    x, y = _batch()
    one = _ensemble(cfg, members=1)
    with pytest.raises(UserError, match="members = 1"):
        build_mutual_bnn(cfg)(Step(one, x, y, Categorical(), 10, 1.0, 0.0))
    plain = Ensemble(lambda: to_mean_field(MLP((5,), 4, (8,))), 2)
    with pytest.raises(UserError, match="wrap_mutual_peer"):
        build_mutual_bnn(cfg)(Step(plain, x, y, Categorical(), 10, 1.0, 0.0))
    with pytest.raises(UserError, match="classification"):
        build_mutual_bnn(cfg, SimpleNamespace(task="regression"))


def test_two_peers_learn_separable_blobs():
    # three Gaussian blobs around the vertices of a triangle (make_blobs-like, no sklearn import)
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 1.5], [-1.3, -0.75], [1.3, -0.75]])
    y = torch.arange(3).repeat_interleave(50)
    x = centers[y] + 0.45 * torch.randn(150, 2, generator=g)
    cfg = MutualBNNConfig(diversity_start=0.5, attention_dim=8, predict_samples=8)
    ens = Ensemble(lambda: wrap_mutual_peer(cfg, MLP((2,), 3, (16, 16))), 2, seed=1,
                   execution="loop")
    update = build_mutual_bnn(cfg)
    # Adam by hand (lr 0.02, betas 0.9/0.999): torch.optim's first use imports the compiler
    moments = {k: (torch.zeros_like(p), torch.zeros_like(p)) for k, p in ens.params.items()}
    torch.manual_seed(0)
    steps = 60
    for i in range(steps):
        res = update(Step(ens.train(), x, y, Categorical(), len(x), 1.0, i / steps))
        with torch.no_grad():
            for k, p in ens.params.items():
                m1, m2 = moments[k]
                m1.lerp_(res.grads[k], 0.1)
                m2.lerp_(res.grads[k].square(), 0.001)
                p -= 0.02 * (m1 / (1 - 0.9 ** (i + 1))) / (
                    (m2 / (1 - 0.999 ** (i + 1))).sqrt() + 1e-8)
    assert res.logs["diversity_scale"] == 1.0 and res.logs["feature_div"] > 0
    ens.eval()
    with torch.no_grad():
        probs = torch.stack([ens(x).softmax(-1) for _ in range(cfg.predict_samples)]).mean(0)
    accuracy = (probs.argmax(-1) == y).float().mean(-1)  # per peer
    assert torch.all(accuracy > 0.95), accuracy
    assert (probs.mean(0).argmax(-1) == y).float().mean() > 0.95
    assert isinstance(dict(ens.module.named_modules())["fc1"], MeanFieldLinear)
