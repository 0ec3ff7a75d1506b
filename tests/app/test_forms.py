"""Ensemble forms (``members_as``): every method × form pair of the method table.

For each pair a method supports: vmap = loop on one update, a run killed mid-epoch
resumes to identical tensors and method state, and ``diverse.load(run).predict``
equals the uninterrupted run's in-process prediction. Every other pair is refused
with one line naming the supported forms. Plus the facts of each form: frozen
parameters are never trained and stored once, BatchEnsemble's closed form, LoRA's
adapters through peft, and the CLI with a pretrained weights file.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import diverse
from callbacks import Interrupt
from diverse.app.train import predict_trained
from diverse.errors import UserError
from diverse.methods.base import Step
from diverse.nets.batchensemble import BatchEnsembleLayer, effective_weight
from diverse.nets.forms import FORMS, BatchEnsemble, Full, Head, LoRA
from diverse.nets.likelihoods import Categorical
from method_table import ROWS
from toy_images import CLASSES, N, images


def backbone() -> nn.Module:
    """A "pretrained" model: the same weights on every call (seeded here)."""
    g = torch.Generator().manual_seed(42)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, CLASSES))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


FORM_OF = {
    "head": Head(("3",)),
    "lora": LoRA(rank=2, alpha=4.0, target_modules=("1", "3")),
    "batchensemble": BatchEnsemble(),
}
PAIRS = [(name, form) for name in sorted(ROWS) for form in FORM_OF
         if form in diverse.METHODS[name].forms]
REFUSED = [(name, form) for name in sorted(ROWS) for form in FORM_OF
           if form not in diverse.METHODS[name].forms]


def loader(shuffle: bool = True) -> DataLoader:
    x, y = images()
    return DataLoader(TensorDataset(x, y), batch_size=10, shuffle=shuffle,
                      generator=torch.Generator() if shuffle else None)


def _run(name: str, form: str, run_dir, **kwargs):
    data = diverse.TrainingData(batches=loader(shuffle=False))
    method = diverse.build_method(ROWS[name].api, data)
    ensemble = method.ensemble(backbone, 2, seed=5, members_as=FORM_OF[form],
                               execution="vmap")
    train = diverse.TrainConfig(epochs=3, lr=0.02, prior_std=1.0, seed=7,
                                checkpoint_every_steps=2)
    result = diverse.fit(ensemble, method, loader(), n_train=N, train=train, run_dir=run_dir,
                         show_progress=False, **kwargs)
    return method, ensemble, result


def test_every_form_is_in_the_table():
    assert set(FORM_OF) | {"full"} == set(FORMS)
    for spec in diverse.METHODS.values():
        assert "full" in spec.forms and set(spec.forms) <= {*FORMS, "heterogeneous"}


@pytest.mark.parametrize(("name", "form"), PAIRS)
def test_a_form_resumes_exactly_and_loads_to_predict_as_in_process(name, form, tmp_path):
    method, full, full_result = _run(name, form, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):  # step 7 of 15: mid epoch 2, after a checkpoint
        _run(name, form, tmp_path / "cut", callbacks=[Interrupt(7)])
    _m, resumed, resumed_result = _run(name, form, tmp_path / "cut", resume=True)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    for key, value in full_result.state.items():
        assert torch.equal(value, resumed_result.state[key]), key
    x, _y = images()
    here = predict_trained(method, Categorical(), full, full_result.samples, x)["probs"]
    loaded = diverse.load(tmp_path / "cut")
    assert loaded.ensemble.form.name == form
    torch.testing.assert_close(loaded.predict(x.numpy()).probs, here, rtol=0, atol=1e-6)
    saved = json.loads((tmp_path / "cut" / "model.json").read_text())
    assert saved["members_as"]["members_as"] == form


@pytest.mark.parametrize(("name", "form"), PAIRS)
def test_a_form_gives_the_same_update_under_vmap_and_loop(name, form):
    x, y = images()
    moved = []
    for execution in ("vmap", "loop"):
        method = diverse.build_method(ROWS[name].api, diverse.TrainingData(inputs=x, targets=y))
        ens = method.ensemble(backbone, 3, seed=1, members_as=FORM_OF[form],
                              execution=execution).train()
        torch.manual_seed(0)
        result = method.update(Step(ens, x[:16], y[:16], Categorical(), N, 1.0, 0.3, 0,
                                    state=method.init_state(ens)))
        moved.append(result.grads if result.grads is not None else
                     {k: v.detach().clone() for k, v in ens.params.items()})
    for k in moved[0]:
        scale = max(1e-3, moved[1][k].abs().max().item())
        torch.testing.assert_close(moved[0][k] / scale, moved[1][k] / scale, atol=2e-5,
                                   rtol=1e-4)


@pytest.mark.parametrize(("name", "form"), REFUSED)
def test_an_unsupported_pair_is_refused_with_one_line(name, form):
    x, y = images()
    method = diverse.build_method(ROWS[name].api, diverse.TrainingData(inputs=x, targets=y))
    with pytest.raises(UserError, match=f"does not train members_as = '{form}': it supports"
                       ) as err:
        method.ensemble(backbone, 2, members_as=FORM_OF[form])
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------- facts of each form
def frozen_backbone() -> nn.Module:
    net = backbone()
    for p in net[1].parameters():
        p.requires_grad_(False)
    return net


def test_frozen_parameters_are_stored_once_and_never_trained(tmp_path):
    method = diverse.build_method(diverse.DeepEnsembleConfig())
    ens = method.ensemble(frozen_backbone, 8, seed=0)  # full form: the user's freezing kept
    assert set(ens.shared) == {"1.weight", "1.bias"} and set(ens.params) == {"3.weight",
                                                                             "3.bias"}
    count = sum(p.numel() for p in ens.parameters())
    assert count == 64 * 12 + 12 + 8 * (12 * 3 + 3)
    before = {k: v.clone() for k, v in ens.shared.items()}
    diverse.fit(ens, method, loader(), n_train=N, train=diverse.TrainConfig(epochs=2, lr=0.05),
                run_dir=tmp_path, show_progress=False)
    for k, v in before.items():
        assert torch.equal(ens.shared[k], v)
    assert ens.frozen_fingerprint() is not None
    checkpoint = json.loads((tmp_path / "checkpoints" / "epoch-0002.json").read_text())
    assert checkpoint["frozen_sha256"] == ens.frozen_fingerprint()


def test_load_refuses_frozen_weights_that_changed(tmp_path):
    method = diverse.build_method(diverse.DeepEnsembleConfig())
    ens = method.ensemble(backbone, 2, seed=0, members_as=Head(("3",)))
    diverse.fit(ens, method, loader(), n_train=N, train=diverse.TrainConfig(epochs=1),
                run_dir=tmp_path, show_progress=False)

    def other() -> nn.Module:
        net = backbone()
        with torch.no_grad():
            net[1].weight.add_(1.0)
        return net

    with pytest.raises(UserError, match="frozen shared weights differ"):
        diverse.load(tmp_path, factory=other)


def test_the_head_form_shares_a_frozen_backbone_in_eval_mode():
    def with_dropout() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Dropout(0.5), nn.Linear(12, 3))

    ens = diverse.Ensemble(with_dropout, 4, members_as=Head(("3",)), execution="vmap").train()
    assert not ens.module[2].training and ens.module[3].training  # no dropout in the backbone
    x = torch.randn(5, 1, 8, 8)
    feats = ens.module[1](x.flatten(1))
    for m in range(4):  # each member: its own head on the one backbone
        expected = feats @ ens.params["3.weight"][m].T + ens.params["3.bias"][m]
        torch.testing.assert_close(ens(x)[m], expected)
    heads = ens.params["3.weight"]
    assert not torch.equal(heads[0], heads[1])  # re-initialized per member


def test_batchensemble_member_is_the_layer_with_weight_w_times_s_r():
    ens = diverse.Ensemble(backbone, 3, members_as=BatchEnsemble(), execution="loop")
    assert set(ens.shared_trainable) == {"1.weight", "3.weight"}
    assert all(set(v.unique().tolist()) <= {-1.0, 1.0} for k, v in ens.params.items()
               if k.endswith((".r", ".s")))
    x = torch.randn(4, 1, 8, 8)
    out = ens(x)
    for m in range(3):
        member = ens.member(m)
        layers = [mod for mod in member if isinstance(mod, BatchEnsembleLayer)]
        h = torch.tanh(x.flatten(1) @ effective_weight(layers[0]).T + layers[0].bias)
        expected = h @ effective_weight(layers[1]).T + layers[1].bias
        torch.testing.assert_close(out[m], expected, rtol=1e-5, atol=1e-6)


def test_batchensemble_slow_weights_get_the_members_summed_gradient():
    x, y = images()
    method = diverse.build_method(diverse.SVGDConfig())  # no shared gradient of its own
    ens = method.ensemble(backbone, 3, seed=2, members_as=BatchEnsemble(), execution="loop")
    optimizer = torch.optim.SGD(list(ens.trainable.values()), lr=0.0)
    target = diverse.LogPosterior(Categorical(), N, 1.0)
    diverse.train_step(ens.train(), method, optimizer, (x[:16], y[:16]), target)
    w = {k: v.detach().clone().requires_grad_(True) for k, v in ens.shared_trainable.items()}
    total = sum(v.square().sum() for v in w.values()) / (2 * N)  # the prior on W, once
    for m in range(3):  # Σ_m NLL_m (the members' priors do not involve W)
        p = {k: v[m].detach() for k, v in ens.params.items()}
        out = torch.func.functional_call(ens.module, {**p, **w}, (x[:16],))
        total = total + nn.functional.cross_entropy(out, y[:16])
    expected = torch.autograd.grad(total, list(w.values()))
    for p, g in zip(ens.shared_trainable.values(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_lora_members_are_peft_adapters_on_one_frozen_base():
    import peft

    ens = diverse.Ensemble(backbone, 4, members_as=LoRA(rank=2, target_modules=("1", "3")))
    assert isinstance(ens.module, peft.PeftModel)
    assert all("lora_" in k for k in ens.params) and len(ens.params) == 4
    assert all(not v.requires_grad for v in ens.shared.values())
    a = ens.params["base_model.model.1.lora_A.default.weight"]
    assert not torch.equal(a[0], a[1])  # each member's own seeded adapters
    assert not ens.params["base_model.model.1.lora_B.default.weight"].detach().any()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():  # B = 0: every member is the base model
        torch.testing.assert_close(ens(x), backbone()(x).expand(4, 5, 3))
    own = peft.get_peft_model(backbone(), peft.LoraConfig(r=2, target_modules=["1", "3"]))
    from_peft = diverse.Ensemble(own, 2, members_as=LoRA(config=own.peft_config["default"]))
    assert set(from_peft.params) == set(ens.params)


def test_full_form_default_is_unchanged():
    from diverse.nets.ensemble import init_members

    def fresh() -> nn.Module:  # every member its own initialization
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 3))

    a = diverse.Ensemble(fresh, 3, seed=4)
    b = diverse.Ensemble(fresh, 3, seed=4, members_as=Full())
    _, params, _ = init_members(fresh, 3, seed=4)  # the members as they always were made
    for k, v in params.items():
        assert torch.equal(a.params[k], v) and torch.equal(b.params[k], v), k
    assert not a.shared and a.form.name == "full"


def test_a_head_form_resolves_its_default_without_changing_the_users_object():
    form = Head()
    first = diverse.Ensemble(backbone, 2, members_as=form)
    other = diverse.Ensemble(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), 2,
                             members_as=form)
    assert form.modules == ()  # the user's object, unchanged
    assert first.form.modules == ("3",) and other.form.modules == ("1",)
    assert set(other.params) == {"1.weight", "1.bias"}


def test_ensemble_honours_every_module_method():
    ens = diverse.Ensemble(lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), 3)
    assert len(list(ens.buffers())) == 3 and dict(ens.named_buffers())
    averaged = torch.optim.swa_utils.AveragedModel(ens, use_buffers=True)
    averaged.update_parameters(ens)
    with torch.no_grad():  # a second point: parameters and (use_buffers) buffers averaged
        before = {k: v.clone() for k, v in ens.params.items()}
        mean_before = ens.member_buffers["1.running_mean"].clone()
        for v in ens.params.values():
            v.add_(1.0)
        ens.member_buffers["1.running_mean"].add_(2.0)
    averaged.update_parameters(ens)
    inner = averaged.module
    for k, v in before.items():
        torch.testing.assert_close(inner.params[k], v + 0.5)
    torch.testing.assert_close(inner.member_buffers["1.running_mean"], mean_before + 1.0)
    copy = diverse.Ensemble(lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), 3,
                            seed=9)
    copy.load_state_dict(ens.state_dict())
    assert all(torch.equal(v, copy.state_dict()[k]) for k, v in ens.state_dict().items())


# ------------------------------------------------------------------------------ CLI
MODULE = '''
from torch import nn


def net(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_outputs))
'''


def test_cli_fine_tunes_heads_on_a_pretrained_weights_file(tmp_path, monkeypatch):
    from diverse.app.cli import main

    (tmp_path / "models.py").write_text(MODULE)
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()},
              str(tmp_path / "backbone.safetensors"))
    config = tmp_path / "c.toml"
    config.write_text('[data]\nname = "digits"\ntrain_subset = 200\n[model]\nname = "custom"\n'
                      'factory = "models:net"\nweights = "backbone.safetensors"\n[ensemble]\n'
                      'members = 3\nmembers_as = "head"\n[method]\nname = "de"\n[train]\n'
                      'epochs = 1\nbatch_size = 50\n')
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 0
    recorded = (tmp_path / "run" / "config.toml").read_text()
    assert "weights_sha256" in recorded
    loaded = diverse.load(tmp_path / "run")
    assert loaded.ensemble.form.name == "head" and set(loaded.ensemble.params) == {
        "3.weight", "3.bias"}
    assert torch.equal(loaded.ensemble.shared["1.weight"], pretrained[1].weight)
    (tmp_path / "backbone.safetensors").write_bytes(b"changed")
    with pytest.raises(UserError, match="SHA-256 is not the recorded"):
        diverse.load(tmp_path / "run")


# ------------------------------------------------------- LoRA: the kernel on ΔW = s·B A
def _lora_ensemble(members: int = 3) -> diverse.Ensemble:
    method = diverse.build_method(diverse.SVGDConfig())
    ens = method.ensemble(backbone, members, seed=3, members_as=LoRA(rank=2, alpha=4.0,
                                                                     target_modules=("1", "3")))
    with torch.no_grad():  # members away from B = 0, where every ΔW is 0
        for k, v in ens.params.items():
            if "lora_B" in k:
                v.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(k)))
    return ens.train()


def test_svgd_on_lora_deltas_is_svgd_with_the_kernel_of_delta_w():
    cfg = diverse.SVGDConfig(lora_space="delta", bandwidth="fixed", bandwidth_value=2.0)
    ens = _lora_ensemble()
    x, y = images()
    result = diverse.build_method(cfg).update(Step(ens, x[:16], y[:16], Categorical(), N,
                                                   1.0, 0.5))
    # the oracle: autograd through k(w_j, w_i) = exp(-||e(w_j) - e(w_i)||² / h)
    w = {k: v.detach().clone().requires_grad_(True) for k, v in ens.params.items()}
    out = ens.apply(w, x[:16])
    loss = diverse.LogPosterior(Categorical(), N, 1.0).loss(out, y[:16], w)
    g = torch.autograd.grad(loss.sum(), list(w.values()))
    e = []
    for layer in ("1", "3"):
        a = w[f"base_model.model.{layer}.lora_A.default.weight"]
        b = w[f"base_model.model.{layer}.lora_B.default.weight"]
        e.append((2.0 * b @ a).flatten(1))
    e = torch.cat(e, 1).double()
    k = torch.exp(-torch.cdist(e, e).square() / 2.0)
    m, c = 3, 1.0 / N
    for i in range(m):
        rep = torch.autograd.grad(k[:, i].sum(), list(w.values()), retain_graph=True,
                                  allow_unused=True)
        for (name, _v), gi, ri in zip(w.items(), g, rep, strict=True):
            drive = sum(k[j, i] * gi[j].double() for j in range(m)) / m
            # Σ_j ∇_{w_j} k(w_j, w_i): row j of the gradient of Σ_j k(w_j, w_i), j ≠ i
            repulsion = sum(ri[j].double() for j in range(m) if j != i)
            expected = drive - (c / m) * repulsion
            torch.testing.assert_close(result.grads[name][i].double(), expected,
                                       rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["svgd", "wgd"])
def test_the_delta_kernel_is_blind_to_the_lora_symmetry(name):
    make = diverse.SVGDConfig if name == "svgd" else diverse.WGDConfig
    x, y = images()
    means = {}
    for space in ("factors", "delta"):
        for turned in (False, True):
            ens = _lora_ensemble()
            if turned:  # (B, A) -> (B R^-1, R A) per member: the same ΔW
                with torch.no_grad():
                    for layer in ("1", "3"):
                        a = ens.params[f"base_model.model.{layer}.lora_A.default.weight"]
                        b = ens.params[f"base_model.model.{layer}.lora_B.default.weight"]
                        r = torch.tensor([[2.0, 0.5], [0.0, 0.25]])
                        a.copy_(r @ a)
                        b.copy_(b @ torch.linalg.inv(r))
            cfg = make(name=name, lora_space=space)
            result = diverse.build_method(cfg).update(Step(ens, x[:16], y[:16], Categorical(),
                                                           N, 1.0, 0.5))
            means[space, turned] = float(result.logs["kernel_mean"])
    assert means["delta", False] == pytest.approx(means["delta", True], rel=1e-5)
    assert means["factors", False] != pytest.approx(means["factors", True], rel=1e-3)


def test_the_delta_kernel_needs_lora_members():
    x, y = images()
    method = diverse.build_method(diverse.SVGDConfig(lora_space="delta"))
    ens = method.ensemble(backbone, 2)
    with pytest.raises(UserError, match="lora_space = 'delta' needs a LoRA ensemble"):
        method.update(Step(ens, x[:8], y[:8], Categorical(), N, 1.0, 0.5))


# --------------------------------------------------- a transformers model, built locally
def tiny_bert() -> nn.Module:
    """A randomly initialized BERT classifier (no download): input ids → ModelOutput."""
    import transformers

    torch.manual_seed(0)  # the "pretrained" weights: the same on every call
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, num_labels=3,
                                     max_position_embeddings=8,
                                     # SDPA has no vmap batching rule on the CPU (torch 2.13)
                                     attn_implementation="eager")
    return transformers.BertForSequenceClassification(config)


def test_lora_members_of_a_transformers_model_train_and_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (N, 6), generator=g)
    y = ids[:, 0] % CLASSES
    batches = DataLoader(TensorDataset(ids, y), batch_size=16, shuffle=True,
                         generator=torch.Generator())
    method = diverse.build_method(diverse.WGDConfig(name="f-wgd"))
    form = LoRA(rank=2, alpha=4.0, target_modules=("query", "value"),
                modules_to_save=("classifier",))
    ens = method.ensemble(tiny_bert, 3, seed=1, members_as=form)
    assert all("lora_" in k or "classifier" in k for k in ens.params)
    assert any("classifier" in k for k in ens.params)  # the new head, per member
    result = diverse.fit(ens, method, batches, n_train=N,
                         train=diverse.TrainConfig(epochs=2, lr=0.01, seed=0),
                         run_dir=tmp_path, show_progress=False)
    assert result.history[-1]["train_nll"] < result.history[0]["train_nll"] + 0.5
    here = predict_trained(method, Categorical(), ens, None, ids)["probs"]
    loaded = diverse.load(tmp_path)
    torch.testing.assert_close(loaded.predict(ids.numpy()).probs, here, rtol=0, atol=1e-6)


def test_lora_modules_to_save_match_whole_module_names():
    """peft matches modules_to_save by name suffix: "out" would also match LoRA's own
    "fc.lora_dropout" (a ModuleDict peft then refuses); diverse unfreezes whole modules."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(64, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.fc(x.flatten(1))))

    ens = diverse.Ensemble(Net, 2, members_as=LoRA(rank=2, target_modules=("fc",),
                                                   modules_to_save=("out",)))
    assert "base_model.model.out.weight" in ens.params
    assert not any("dropout" in k for k in ens.params)
    with pytest.raises(UserError, match="modules_to_save: 'head' is not a module"):
        diverse.Ensemble(Net, 2, members_as=LoRA(rank=2, target_modules=("fc",),
                                                 modules_to_save=("head",)))
