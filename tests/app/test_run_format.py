"""One run format: a CLI run writes the same model description (``model.json``) as a
``diverse.fit`` run, and ``diverse.load`` builds every run from it."""

from __future__ import annotations

import json

import numpy as np
import torch

import diverse
from diverse.app.cli import main


def test_a_cli_run_describes_itself_like_a_fit_run_and_loads_from_it(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[data]\nname = "digits"\ntrain_subset = 200\n[model]\nhidden = [16]\n'
                      '[ensemble]\nmembers = 2\nmembers_as = "head"\n[train]\nepochs = 1\n'
                      'batch_size = 50\n')
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    saved = json.loads((tmp_path / "run" / "model.json").read_text())
    fit_keys = {"method", "members", "seed", "execution", "members_as", "likelihood",
                "factory", "file", "input_dtype"}
    assert fit_keys <= set(saved) and saved["model"]["hidden"] == [16]
    assert saved["members_as"]["members_as"] == "head" and saved["factory"] is None
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    probs = diverse.load(tmp_path / "run").predict(x).probs
    # a run written before model.json existed: the same description, from config.toml
    (tmp_path / "run" / "model.json").unlink()
    torch.testing.assert_close(diverse.load(tmp_path / "run").predict(x).probs, probs,
                               rtol=0, atol=0)
