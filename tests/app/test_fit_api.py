"""The Python API: every method through ``diverse.fit`` on a user module and DataLoader.

One table row per method of :data:`diverse.METHODS` (a new method adds one row);
each trains a plain ``nn.Sequential`` from a ``DataLoader`` through the public
API, checkpoints, and is loaded back with ``diverse.load`` to predict exactly as
in process. Exact resume mid-epoch is checked against an uninterrupted run.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import diverse
from callbacks import Interrupt
from diverse.app.loop import TensorBatches
from diverse.app.train import predict_trained
from diverse.errors import UserError
from diverse.methods.spaces import pca_lengthscales, pca_lengthscales_from_batches
from diverse.nets.likelihoods import Categorical
from method_table import ROWS
from toy_images import CLASSES, N, images


def sequential() -> nn.Module:
    """A user's module that is not in diverse.nets.models (no feature_layers)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, CLASSES))


def with_dropout() -> nn.Module:
    """The same with dropout before its output layer (MC dropout's weight masks)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Dropout(0.2),
                         nn.Linear(12, CLASSES))


def loader(shuffle: bool = True, batch_size: int = 16) -> DataLoader:
    x, y = images()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator() if shuffle else None)


TRAIN = diverse.TrainConfig(epochs=2, lr=0.01, prior_std=1.0, seed=3)

#: name -> (config, train settings[, factory]), from the one method table
CASES = {name: (row.api, TRAIN, *([with_dropout] if row.dropout else []))
         for name, row in ROWS.items()}


def test_the_table_has_a_row_for_every_method():
    assert set(CASES) == set(diverse.METHODS)


def _train(name: str, run_dir, **kwargs):
    config, train, *factory = CASES[name]
    data = diverse.TrainingData(batches=loader(shuffle=False), name="the test images")
    method = diverse.build_method(config, data)
    ensemble = method.ensemble(factory[0] if factory else sequential, 3, seed=1)
    result = diverse.fit(ensemble, method, loader(), n_train=N, train=train, val=images(),
                         run_dir=run_dir, show_progress=False, **kwargs)
    return method, ensemble, result


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_method_trains_through_fit_and_loads_to_predict_exactly(name, tmp_path):
    method, ensemble, result = _train(name, tmp_path / name)
    assert [r["epoch"] for r in result.history] == [1, 2]
    last = result.history[-1]
    assert all(torch.isfinite(torch.tensor(last[k])) for k in ("train_loss", "train_nll"))
    assert 0.0 <= last["val_accuracy"] <= 1.0
    weight_samples = diverse.METHODS[name].prediction == "weight-samples"
    assert (result.samples is not None) == weight_samples
    x, _y = images()
    here = predict_trained(method, Categorical(), ensemble, result.samples, x)["probs"]
    loaded = diverse.load(tmp_path / name)  # the factory is re-imported from this module
    assert torch.equal(loaded.predict(x.numpy()).probs, here)
    saved = json.loads((tmp_path / name / "model.json").read_text())
    assert saved["factory"] == f"{__name__}:{(CASES[name][2:] or [sequential])[0].__name__}"


def test_fit_learns_the_separable_images(tmp_path):
    config = diverse.DeepEnsembleConfig()
    method = diverse.build_method(config)
    ensemble = method.ensemble(sequential, 2, seed=0)
    train = diverse.TrainConfig(epochs=15, lr=0.03, seed=0)
    history = diverse.fit(ensemble, method, loader(), n_train=N, train=train, val=images(),
                          show_progress=False).history
    assert history[-1]["val_accuracy"] > 0.9 > history[0]["val_accuracy"] - 0.5


class Augmented(torch.utils.data.Dataset):
    """A user's dataset whose transform draws from torch's global generator."""

    def __init__(self) -> None:
        self.x, self.y = images()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        flip = bool(torch.rand(()) < 0.5)
        x = self.x[i].flip(-1) if flip else self.x[i]
        return x + 0.05 * torch.randn(x.shape), self.y[i]


def _resumable(name: str, run_dir, workers: int = 0, **kwargs):
    config, _train, *factory = CASES[name]
    data = diverse.TrainingData(batches=loader(shuffle=False))
    method = diverse.build_method(config, data)
    ensemble = method.ensemble(factory[0] if factory else sequential, 2, seed=5)
    batches = DataLoader(Augmented(), batch_size=10, shuffle=True, num_workers=workers)
    train = diverse.TrainConfig(epochs=3, lr=0.02, prior_std=1.0, seed=7,
                                checkpoint_every_steps=2)
    result = diverse.fit(ensemble, method, batches, n_train=N, train=train, run_dir=run_dir,
                         show_progress=False, **kwargs)
    return ensemble, result


@pytest.mark.parametrize("name", ["de", "swag", "sghmc", "mc-dropout", "he-cka"])
def test_a_run_killed_mid_epoch_resumes_to_identical_parameters(name, tmp_path):
    full, full_result = _resumable(name, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):  # step 7 of 15: mid epoch 2, after a checkpoint
        _resumable(name, tmp_path / "cut", callbacks=[Interrupt(7)])
    latest = json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())
    assert latest["manifest"] == "epoch-0001-step-00000006.json"
    resumed, resumed_result = _resumable(name, tmp_path / "cut", resume=True)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert [r["train_loss"] for r in full_result.history] == \
        [r["train_loss"] for r in resumed_result.history]
    if full_result.samples is not None:
        for key, value in full_result.samples.params.items():
            assert torch.equal(value, resumed_result.samples.params[key])


def test_resume_is_exact_with_loader_workers(tmp_path):
    full, _ = _resumable("de", tmp_path / "full", workers=2)
    with pytest.raises(KeyboardInterrupt):
        _resumable("de", tmp_path / "cut", workers=2, callbacks=[Interrupt(8)])
    resumed, _ = _resumable("de", tmp_path / "cut", workers=2, resume=True)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_tensor_batches_reseed_repeats_the_order_and_the_augmentation():
    x, y = images()
    batches = TensorBatches(x, y, 16, augment=True, crop_padding=1)
    batches.reseed(11)
    first = [b[0] for b in batches]
    batches.reseed(11)
    again = [b[0] for b in batches]
    batches.reseed(12)
    other = [b[0] for b in batches]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_streamed_pca_equals_the_tensor_pca():
    x, _y = images()
    for form in ("reference", "covariance", "correlation"):
        exact = pca_lengthscales(x.double(), 1.0, form)
        streamed = pca_lengthscales_from_batches(
            DataLoader(TensorDataset(x.double(), _y), batch_size=7), 1.0, form)
        # eigenvalues λ = scale² (48 inputs in 64 dimensions: 16+ are 0 up to rounding)
        torch.testing.assert_close(streamed.scale ** 2, exact.scale ** 2, rtol=1e-9, atol=1e-10)
        # eigenvectors up to sign, where the eigenvalue is well separated
        gaps = (exact.scale[:-1] ** 2 - exact.scale[1:] ** 2).abs() > 1e-6
        dots = (streamed.basis * exact.basis).sum(0).abs()
        assert torch.allclose(dots[:-1][gaps], torch.ones_like(dots[:-1][gaps]), atol=1e-6)


# ----------------------------------------------------------------- refusals


def test_a_method_that_wraps_its_members_refuses_a_plain_ensemble():
    method = diverse.build_method(diverse.VIConfig())
    with pytest.raises(UserError, match="method.ensemble"):
        diverse.fit(diverse.Ensemble(sequential, 2), method, loader(), n_train=N,
                    show_progress=False)


def test_a_sampler_refuses_weight_decay():
    method = diverse.build_method(diverse.SGHMCConfig())
    ensemble = method.ensemble(sequential, 2)
    with pytest.raises(UserError, match="weight_decay"):
        diverse.fit(ensemble, method, loader(), n_train=N, show_progress=False,
                    train=diverse.TrainConfig(weight_decay=0.1))


def test_batches_without_a_length_are_refused():
    method = diverse.build_method(diverse.DeepEnsembleConfig())
    with pytest.raises(UserError, match="len"):
        diverse.fit(method.ensemble(sequential, 2), method, (b for b in loader()), n_train=N,
                    show_progress=False)


def test_train_config_is_valid_once_constructed():
    with pytest.raises(UserError, match=r"\[train\] lr = inf"):
        diverse.TrainConfig(lr=float("inf"))
    with pytest.raises(UserError, match="optimizer"):
        diverse.TrainConfig(optimizer="lbfgs")


def test_forde_pca_needs_training_inputs():
    with pytest.raises(UserError, match="training inputs"):
        diverse.build_method(diverse.FoRDEConfig())


def test_a_lambda_factory_needs_factory_at_load(tmp_path):
    method = diverse.build_method(diverse.DeepEnsembleConfig())
    ensemble = method.ensemble(lambda: sequential(), 2)
    diverse.fit(ensemble, method, loader(), n_train=N, run_dir=tmp_path / "run",
                train=diverse.TrainConfig(epochs=1), show_progress=False)
    with pytest.raises(UserError, match="factory="):
        diverse.load(tmp_path / "run")
    x, _y = images()
    loaded = diverse.load(tmp_path / "run", factory=sequential)
    here = predict_trained(method, Categorical(), ensemble, None, x)["probs"]
    assert torch.equal(loaded.predict(x).probs, here)
