"""Members of different architectures (``diverse.Heterogeneous``): groups stacked and
vectorized, trained by the methods that compare members through outputs, input gradients
or features, and loaded back to predict exactly; weight-space methods refuse."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import diverse
from callbacks import Interrupt
from diverse.app.train import predict_trained
from diverse.errors import UserError
from diverse.math import cka
from diverse.methods.base import Step
from diverse.nets.likelihoods import Categorical
from toy_images import CLASSES, N, images

P_DROP = 1e-6  # MC dropout's layers; ≈ 0 so that vmap and loop (other masks) agree


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh())
        self.out = nn.Sequential(nn.Dropout(P_DROP), nn.Linear(12, CLASSES))

    def forward(self, x):
        return self.out(self.body(x))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.out = nn.Sequential(nn.Dropout(P_DROP), nn.Linear(3 * 64, CLASSES))

    def forward(self, x):
        return self.out(self.body(x))


def mlp() -> nn.Module:
    return MLP()


def cnn() -> nn.Module:
    return CNN()


GROUPS = diverse.Heterogeneous([(mlp, 2), (cnn, 1)])
CONFIGS = {
    "de": diverse.DeepEnsembleConfig(),
    "f-wgd": diverse.WGDConfig(name="f-wgd"),
    "f-svgd": diverse.SVGDConfig(name="f-svgd", output="logits"),
    "forde": diverse.FoRDEConfig(lengthscales="identity"),
    "he-cka": diverse.HECKAConfig(layers=("body", "output")),
    # independent members: trained group by group, weight samples per group
    "mc-dropout": diverse.MCDropoutConfig(predict_samples=3),
    "swag": diverse.SWAGConfig(swa_start=0.3, swa_frequency=1, rank=2, predict_samples=3),
    "laplace": diverse.LaplaceConfig(predict_samples=3, marglik_steps=5),
}


def loader() -> DataLoader:
    x, y = images()
    return DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True,
                      generator=torch.Generator())


def _run(name, run_dir, **kwargs):
    x, y = images()
    method = diverse.build_method(CONFIGS[name], diverse.TrainingData(inputs=x, targets=y))
    ens = method.ensemble(GROUPS, 3, seed=2, execution="vmap")
    train = diverse.TrainConfig(epochs=3, lr=0.02, prior_std=1.0, seed=1,
                                checkpoint_every_steps=2)
    result = diverse.fit(ens, method, loader(), n_train=N, train=train, run_dir=run_dir,
                         show_progress=False, **kwargs)
    return method, ens, result


def test_the_table_names_the_heterogeneous_methods():  # (and they are all tested here)
    assert {n for n, s in diverse.METHODS.items() if "heterogeneous" in s.forms} == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_heterogeneous_ensemble_trains_resumes_and_loads(name, tmp_path):
    method, ens, result = _run(name, tmp_path / "full")
    assert ens.members == 3 and [g.members for g in ens.groups] == [2, 1]
    assert {k.partition("/")[0] for k in ens.params} == {"group0", "group1"}
    with pytest.raises(KeyboardInterrupt):
        _run(name, tmp_path / "cut", callbacks=[Interrupt(7)])
    _m, resumed, _r = _run(name, tmp_path / "cut", resume=True)
    for k, v in ens.state_tensors().items():
        assert torch.equal(v, resumed.state_tensors()[k]), k
    for k, v in result.state.items():  # the method's state, group by group
        assert torch.equal(v, _r.state[k]), k
    x, _y = images()
    here = predict_trained(method, Categorical(), ens, result.samples, x)["probs"]
    draws = 1 if result.samples is None else result.samples.draws
    assert here.shape == (3 * draws, N, CLASSES)
    if result.samples is not None:  # draw-major: draw 0 of members 0, 1 (MLP), 2 (CNN) first
        first = predict_trained(method, Categorical(), ens.groups[1], result.samples.groups[1],
                                x)["probs"]
        torch.testing.assert_close(here[2], first[0])
    loaded = diverse.load(tmp_path / "cut")  # both factories re-imported from this module
    torch.testing.assert_close(loaded.predict(x.numpy()).probs, here, rtol=0, atol=1e-6)
    saved = json.loads((tmp_path / "cut" / "model.json").read_text())
    assert [g["members"] for g in saved["groups"]] == [2, 1]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_heterogeneous_update_is_the_same_under_vmap_and_loop(name):
    x, y = images()
    grads = []
    for execution in ("vmap", "loop"):
        method = diverse.build_method(CONFIGS[name], diverse.TrainingData(inputs=x, targets=y))
        ens = method.ensemble(GROUPS, 3, seed=4, execution=execution).train()
        torch.manual_seed(0)
        step = Step(ens, x[:16], y[:16], Categorical(), N, 1.0, 0.5,
                    state=method.init_state(ens))
        grads.append(method.update(step).grads)
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4)


def test_a_heterogeneous_ensemble_equals_its_groups():
    ens = diverse.Ensemble(mlp, 2, seed=7)
    hetero = diverse.build_method(diverse.DeepEnsembleConfig()).ensemble(
        diverse.Heterogeneous([(mlp, 2), (cnn, 1)]), 3, seed=7)
    x, _ = images()
    torch.testing.assert_close(hetero(x)[:2], ens(x))  # member m has its global seed
    assert torch.equal(hetero.member(2).out[1].weight,
                       hetero.groups[1].params["out.1.weight"][0])


def test_padded_features_keep_every_kernel_between_groups():
    hetero = diverse.build_method(diverse.DeepEnsembleConfig()).ensemble(GROUPS, 3, seed=1)
    x, _ = images()
    _out, feats = hetero.features(x[:10], ["body"])
    assert feats["body"].shape == (3, 10, 192)  # 12 (MLP) padded to 192 (CNN)
    own = [hetero.groups[0].features(x[:10], ["body"])[1]["body"][0],
           hetero.groups[1].features(x[:10], ["body"])[1]["body"][0]]
    for kind in ("linear", "rbf"):  # Gram matrices and distances: unchanged by zero padding
        for padded, exact in zip((feats["body"][0], feats["body"][2]), own, strict=True):
            torch.testing.assert_close(cka.gram(padded, kind), cka.gram(exact, kind))


@pytest.mark.parametrize("name", ["svgd", "wgd", "svgd-cka", "sghmc", "vi"])
def test_weight_space_methods_refuse_heterogeneous_members(name):
    from method_table import ROWS

    x, y = images()
    method = diverse.build_method(ROWS[name].api, diverse.TrainingData(inputs=x, targets=y))
    with pytest.raises(UserError, match="does not train heterogeneous members"):
        method.ensemble(GROUPS, 3)


def test_groups_must_add_up_to_the_members():
    method = diverse.build_method(diverse.DeepEnsembleConfig())
    with pytest.raises(UserError, match="members = 4: the heterogeneous groups hold 3"):
        method.ensemble(GROUPS, 4)
