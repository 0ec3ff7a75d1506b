"""The Lightning adapter: any diverse method trained by ``lightning.Trainer`` (CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import diverse

L = pytest.importorskip("lightning")
from diverse.app.lightning import DiverseModule  # noqa: E402

N, CLASSES = 60, 3


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % CLASSES
    return torch.randn(N, 1, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1) - 1.0, y


def net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Tanh(), nn.Dropout(0.1),
                         nn.Linear(10, CLASSES))


def loader() -> DataLoader:
    return DataLoader(TensorDataset(*data()), batch_size=20, shuffle=False)


def trainer(epochs: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def quietly(fn):
    """Lightning's advice (few loader workers, ...) is not what these tests check."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(num_workers|does not have many workers|"
                                r"LeafSpec|small number of|no `val_dataloader`).*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return fn()


TRAIN = diverse.TrainConfig(epochs=3, lr=0.02, prior_std=1.0, seed=0)


@pytest.mark.parametrize("config", [diverse.DeepEnsembleConfig(), diverse.SVGDConfig()],
                         ids=["de", "svgd"])
def test_the_trainer_reaches_the_parameters_fit_reaches(config):
    method = diverse.build_method(config)
    ours = method.ensemble(lambda: _no_dropout(), 3, seed=2)
    diverse.fit(ours, method, loader(), n_train=N, train=TRAIN, show_progress=False)
    theirs = method.ensemble(lambda: _no_dropout(), 3, seed=2)
    module = DiverseModule(theirs, method, n_train=N, train=TRAIN)
    quietly(lambda: trainer(TRAIN.epochs).fit(module, loader()))
    assert int(module.diverse_step) == 3 * len(loader())
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(module.ensemble.state_dict()[key], value, rtol=1e-6,
                                   atol=1e-7)


def _no_dropout() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Tanh(), nn.Linear(10, CLASSES))


@pytest.mark.parametrize("config", [
    diverse.SWAGConfig(swa_start=0.3, swa_frequency=1, rank=2, predict_samples=3),
    diverse.SGHMCConfig(burn_in=0.3, cycles=1, predict_samples=2),
    diverse.MCDropoutConfig(predict_samples=2),
    diverse.LaplaceConfig(predict_samples=2, marglik_steps=5),
], ids=["swag", "sghmc", "mc-dropout", "laplace"])
def test_bayesian_baselines_train_validate_and_draw_samples_under_the_trainer(config):
    method = diverse.build_method(config, diverse.TrainingData(batches=loader()))
    module = DiverseModule(method.ensemble(net, 2, seed=0), method, n_train=N, train=TRAIN)
    run = trainer(TRAIN.epochs)
    quietly(lambda: run.fit(module, loader(), val_dataloaders=loader()))
    assert module.samples is not None and module.samples.member.numel() > 0
    logged = run.logged_metrics
    assert {"train_loss_epoch", "val_nll", "val_accuracy"} <= set(logged)
    assert torch.isfinite(logged["val_nll"])
    predictions = quietly(lambda: run.predict(module, loader()))
    assert predictions[0]["probs"].shape[1:] == (20, CLASSES)
    if method.name != "mc-dropout":  # deterministic members: the logged figure recomputes
        probs = torch.cat([p["probs"] for p in predictions], dim=1).double().mean(0)
        accuracy = (probs.argmax(1) == data()[1]).double().mean()
        torch.testing.assert_close(logged["val_accuracy"].double(), accuracy)


def test_an_enclosing_module_sees_the_ensembles_parameters():
    method = diverse.build_method(diverse.DeepEnsembleConfig())
    module = DiverseModule(method.ensemble(net, 4), method, n_train=N)
    stacked = dict(module.named_parameters())
    assert stacked["ensemble.stacked.1.weight"].shape == (4, 10, 64)
    assert sum(p.numel() for p in module.parameters()) == 4 * sum(
        p.numel() for p in net().parameters())


@pytest.mark.parametrize("config", [
    diverse.SWAGConfig(swa_start=0.3, swa_frequency=1, rank=2, predict_samples=3),
    diverse.LaplaceConfig(predict_samples=2, marglik_steps=5),
], ids=["swag", "laplace"])
def test_the_trainers_weight_samples_equal_fits(config):
    """The collection and the finalizer see the same steps under both loops."""
    method = diverse.build_method(config, diverse.TrainingData(batches=loader()))
    ours = method.ensemble(_no_dropout, 2, seed=4)
    expected = diverse.fit(ours, method, loader(), n_train=N, train=TRAIN,
                           show_progress=False).samples
    module = DiverseModule(method.ensemble(_no_dropout, 2, seed=4), method, n_train=N,
                           train=TRAIN)
    quietly(lambda: trainer(TRAIN.epochs).fit(module, loader()))
    assert module.samples.params.keys() == expected.params.keys()
    for key, value in expected.params.items():
        torch.testing.assert_close(module.samples.params[key], value, rtol=1e-5, atol=1e-6)
    assert torch.equal(module.samples.member, expected.member)
