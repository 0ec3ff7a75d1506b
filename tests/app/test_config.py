"""Config parsing: types, unknown keys, overrides, TOML round trip."""

import pytest

from diverse.app.config import (
    config_from_dict,
    config_to_toml,
    load_config,
    parse_override,
)
from diverse.errors import UserError
from diverse.methods.base import DeepEnsembleConfig
from diverse.nets.models import LeNetConfig, MLPConfig


def test_defaults_and_named_sections(tmp_path):
    cfg = config_from_dict({})
    assert isinstance(cfg.model, MLPConfig) and isinstance(cfg.method, DeepEnsembleConfig)
    assert cfg.ensemble.members == 5 and cfg.train.optimizer == "adam"
    cfg = config_from_dict({"model": {"name": "lenet5", "dropout": 0.1},
                            "train": {"lr": 1, "betas": [0.8, 0.9]}})
    assert isinstance(cfg.model, LeNetConfig) and cfg.model.dropout == 0.1
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.8, 0.9)


def test_toml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nname = "mlp"\nhidden = [64]\n[train]\nepochs = 3\n')
    cfg = load_config(path, ["train.lr=0.01", "model.hidden=[10, 20]", "data.name=digits",
                             "ensemble.execution=loop", "data.ood=[\"uniform\"]"])
    assert cfg.train.lr == 0.01 and cfg.model.hidden == (10, 20)
    assert cfg.data.name == "digits" and cfg.ensemble.execution == "loop"
    assert cfg.data.ood == ("uniform",) and cfg.train.epochs == 3
    again = tmp_path / "again.toml"
    again.write_text(config_to_toml(cfg))
    assert load_config(again) == cfg
    assert parse_override("data.name=fashion-mnist") == ("data", "name", "fashion-mnist")


@pytest.mark.parametrize(("raw", "message"), [
    ({"trian": {}}, r"unknown section \[trian\]; allowed: data, model"),
    ({"train": {"learning_rate": 1}}, r"unknown key \[train\] 'learning_rate'; allowed: epochs"),
    ({"train": {"lr": "fast"}}, r"\[train\] lr = 'fast': expected a number"),
    ({"train": {"epochs": 2.5}}, r"\[train\] epochs = 2.5: expected an integer"),
    ({"train": {"nesterov": 1}}, r"\[train\] nesterov = 1: expected true/false"),
    ({"ensemble": {"members": 0}}, r"\[ensemble\] members = 0: must be an integer >= 1"),
    ({"ensemble": {"execution": "gpu"}}, r"execution = 'gpu': allowed auto, vmap, loop"),
    ({"data": {"name": "imagenet"}}, r"\[data\] name = 'imagenet': allowed .*fashion-mnist"),
    ({"model": {"name": "vit"}}, r"unknown model 'vit'; allowed: .*lenet5"),
    ({"method": {"name": "magic"}}, r"unknown method 'magic'; allowed: de, f-svgd"),
    ({"model": {"name": "mlp", "depth": 3}},
     r"unknown key \[model\] 'depth'; allowed: name, hidden"),
    ({"train": {"optimizer": "lbfgs"}}, r"optimizer = 'lbfgs': allowed sgd, adam, adamw"),
    ({"train": {"prior_std": 1.0, "weight_decay": 1e-4}}, r"set one of them, not both"),
])
def test_bad_configs_name_the_key_and_the_allowed_values(raw, message):
    with pytest.raises(UserError, match=message):
        config_from_dict(raw)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(UserError, match="expected section.key=value"):
        load_config(None, ["lr=0.1"])
