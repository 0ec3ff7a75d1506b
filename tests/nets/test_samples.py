"""Weight-sample collections: safetensors round trip with a checked manifest, draw-major
order, prediction through samples equal to the ensemble's, and runs that end in samples."""

import json

import pytest
import torch
from torch import nn

from diverse.app.config import load_config
from diverse.app.train import build_run, load_trained, predict_run, train
from diverse.checkpoint import sha256
from diverse.errors import UserError
from diverse.evaluation.evaluate import evaluate
from diverse.nets.ensemble import Ensemble
from diverse.nets.likelihoods import Categorical
from diverse.nets.samples import (
    Samples,
    check_params,
    collect_members,
    draw_major_members,
    load_samples,
    predict,
    save_samples,
    stack_draws,
)


def small_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(),
                         nn.Linear(5, 3))


def random_samples(count=6, members=3):
    g = torch.Generator().manual_seed(0)
    skeleton = small_net()
    params = {k: torch.randn(count, *v.shape, generator=g) for k, v in skeleton.named_parameters()}
    buffers = {k: torch.rand(count, *v.shape, generator=g).add(0.5) if v.is_floating_point()
               else torch.full((count,), 7) for k, v in skeleton.named_buffers()}
    return skeleton, Samples(params, buffers, draw_major_members(members, count // members))


def test_draw_major_order_and_stacking():
    assert draw_major_members(3, 2).tolist() == [0, 1, 2, 0, 1, 2]
    a, b = {"w": torch.tensor([[1.0], [2.0]])}, {"w": torch.tensor([[3.0], [4.0]])}
    assert stack_draws([a, b])["w"].flatten().tolist() == [1.0, 2.0, 3.0, 4.0]


def test_samples_round_trip_through_safetensors_with_a_checked_manifest(tmp_path):
    _, samples = random_samples()
    path = save_samples(tmp_path, samples, "swag", {"method": {"name": "swag"}})
    loaded, manifest = load_samples(tmp_path)
    for k, v in samples.params.items():
        assert torch.equal(loaded.params[k], v)
    for k, v in samples.buffers.items():
        assert torch.equal(loaded.buffers[k], v)
    assert loaded.member.tolist() == [0, 1, 2, 0, 1, 2]
    assert (manifest["method"], manifest["count"], manifest["members"], manifest["draws"]) == \
        ("swag", 6, 3, 2)
    assert manifest["params"]["1.weight"] == [5, 6]
    tensors = tmp_path / "samples" / "samples.safetensors"
    assert manifest["file"]["sha256"] == sha256(tensors)
    assert json.loads(path.read_text())["config"] == {"method": {"name": "swag"}}
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(UserError, match="missing or corrupt"):
        load_samples(tmp_path)
    with pytest.raises(UserError, match="no weight samples"):
        load_samples(tmp_path / "elsewhere")


def test_prediction_through_samples_equals_the_ensemble_in_eval_mode():
    ens = Ensemble(small_net, 3, seed=1, execution="loop")
    with torch.no_grad():  # non-trivial BatchNorm statistics per member
        ens.member_buffers["2.running_mean"].normal_()
        ens.member_buffers["2.running_var"].uniform_(0.5, 2.0)
    skeleton = small_net()
    samples = collect_members(skeleton, ens.params, ens.member_buffers)
    assert samples.count == 3 and samples.draws == 1
    x = torch.randn(11, 6)
    expected = Categorical().predict(ens.eval()(x))["probs"]
    got = predict(skeleton, samples, Categorical(), x, batch_size=4)["probs"]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_samples_that_do_not_match_the_model_are_refused():
    skeleton, samples = random_samples()
    check_params(skeleton, samples.params)
    bad = {**samples.params, "1.weight": torch.zeros(6, 5, 7)}
    with pytest.raises(UserError, match="parameter '1.weight' expected shape"):
        check_params(skeleton, bad)


def test_a_baseline_run_saves_its_samples_and_reloads_them_for_prediction(tmp_path):
    cfg = load_config(None, ["data.name=digits", "data.train_subset=200", "data.test_subset=50",
                             "model.name=mlp", "model.hidden=[8]", "ensemble.members=2",
                             "train.epochs=2", "train.batch_size=50", "train.eval_every=0",
                             "method.name=swag", "method.swa_start=0", "method.swa_frequency=1",
                             "method.rank=2", "method.predict_samples=3"])
    run = build_run(cfg)
    train(run, tmp_path, show_progress=False)
    manifest = json.loads((tmp_path / "samples" / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["config"]["method"]["name"] == "swag"
    again = load_trained(tmp_path, cfg)
    for k, v in run.samples.params.items():
        assert torch.equal(again.samples.params[k], v)
    probs = predict_run(again, again.dataset.x_test)["probs"]
    assert probs.shape == (6, 50, 10)
    torch.testing.assert_close(probs, predict_run(run, run.dataset.x_test)["probs"])
    figures, _ = evaluate(again)
    assert figures["predictive_samples"] == 6
