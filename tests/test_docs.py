"""The README and every page of docs/ as written: their code runs.

* every ``python`` block runs (in a scratch folder holding the small runs and config they
  name): the README's quick start, the library guide's walk-through (checked against the
  in-process predictions), the pretrained-model examples, the sharded-run snippet (here
  one process);
* every ``toml`` block is a valid config;
* every ``bash`` line names a real command: ``diverse`` subcommands parse with the CLI's
  own parser, scripts and examples exist (training commands are the CLI suites' business);
* the method table's form axis in docs/methods/index.md is generated from ``diverse.METHODS``.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch

import diverse
from diverse.app.cli import _parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", page.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder with the runs and config the examples name."""
    folder = tmp_path_factory.mktemp("docs")
    config = folder / "c.toml"
    config.write_text('[data]\nname = "fashion-mnist"\ntrain_subset = 600\ntest_subset = 200\n'
                      'validation_fraction = 0.25\n[model]\nhidden = [32]\n[ensemble]\n'
                      'members = 2\n[train]\nepochs = 1\nbatch_size = 64\n')
    assert main(["train", str(config), "--out", str(folder / "runs/fmnist-cal"),
                 "--quiet"]) == 0
    (folder / "config.toml").write_text('[data]\nname = "digits"\ntrain_subset = 200\n'
                                        '[ensemble]\nmembers = 2\n[train]\nepochs = 1\n')
    return folder


def _run(page: Path, folder: Path, monkeypatch) -> list[dict]:
    monkeypatch.chdir(folder)
    spaces = []
    for block in blocks(page, "python"):
        namespace: dict = {"__name__": "docs_example"}
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102
        spaces.append(namespace)
    return spaces


def test_every_page_with_code_is_covered():
    with_python = {p.name for p in PAGES if blocks(p, "python")}
    assert {"README.md", "library.md", "pretrained.md", "scaling.md"} <= with_python


def test_readme_quick_start_runs(scratch, monkeypatch):
    from diverse.app.train import predict_trained
    from diverse.nets.likelihoods import Categorical

    (ns,) = _run(ROOT / "README.md", scratch, monkeypatch)
    assert ns["members"].form.name == "lora" and not ns["members"].shared_trainable
    # the loaded run predicts exactly as the trained members in process
    here = predict_trained(ns["method"], Categorical(), ns["members"], None, ns["x"][:4])
    assert ns["probs"].shape == (8, 4, 3) and torch.equal(ns["probs"], here["probs"])
    assert ns["result"].history[-1]["train_nll"] < ns["result"].history[0]["train_nll"] + 0.1


def test_library_guide_runs_and_predicts_as_in_process(scratch, monkeypatch):
    from diverse import metrics
    from diverse.app.train import predict_trained
    from diverse.math.calibration import apply_temperature
    from diverse.nets.likelihoods import Categorical

    spaces = _run(ROOT / "docs" / "library.md", scratch, monkeypatch)
    walk = next(ns for ns in spaces if "make_net" in ns)
    assert walk["probs"].shape == (5, 297, 10)
    assert float(metrics.accuracy(walk["probs"], walk["y"][1500:])) > 0.85
    here = predict_trained(walk["method"], Categorical(), walk["members"], None,
                           walk["x"][1500:])["probs"]
    assert torch.equal(walk["probs"], here)
    loaded = next(ns for ns in spaces if "calibrated" in ns)
    run, pred = loaded["run"], loaded["pred"]
    expected = apply_temperature(run.calibration.temperature["pooled"], "pooled",
                                 probs=pred.probs)
    torch.testing.assert_close(loaded["calibrated"].probs, expected)
    assert loaded["sets"].shape == (16, 10) and loaded["sets"].dtype == torch.bool


@pytest.mark.parametrize("name", ["pretrained.md", "scaling.md"])
def test_other_python_examples_run(name, scratch, monkeypatch):
    spaces = _run(ROOT / "docs" / name, scratch, monkeypatch)
    if name == "pretrained.md":
        groups, forms = spaces  # in page order
        assert sum(v.numel() for v in forms["heads"].shared.values()) == 64 * 32 + 32
        assert [g.members for g in groups["hetero"].groups] == [2, 3]
    else:
        assert (scratch / "runs/big/checkpoints/latest.json").is_file()


def test_toml_blocks_are_valid_configs(tmp_path):
    from diverse.app.config import config_from_dict

    found = 0
    for page in PAGES:
        for block in blocks(page, "toml"):
            raw = tomllib.loads(block)
            model = raw.get("model", {})
            model.pop("weights", None)  # a file the example names: its own test reads one
            config_from_dict(raw)
            found += 1
    assert found >= 1


def test_bash_lines_name_real_commands():
    parser = _parser()
    for page in PAGES:
        for block in blocks(page, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split("#")[0])
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value cmd
                    words = words[1:]
                if not words:
                    continue
                head = words[0].removeprefix(".venv/bin/")
                if head == "diverse":
                    try:
                        parser.parse_args(words[1:])
                    except SystemExit as stop:  # --help exits 0; bad arguments 2
                        assert stop.code == 0, f"{page.name}: {line}"
                elif head in ("python", "bash"):
                    assert (ROOT / words[1]).is_file(), f"{page.name}: {line}"
                elif head == "torchrun":
                    assert "diverse.app.launch" in words, f"{page.name}: {line}"
                else:
                    assert head in ("mkdocs",), f"{page.name}: unknown command in {line!r}"


def test_the_forms_table_is_generated_from_the_method_table():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = hooks.on_page_markdown((ROOT / "docs" / "methods" / "index.md").read_text())
    rows = [r for r in page.splitlines() if r.startswith("| `")]
    assert {r.split("`")[1] for r in rows} >= set(diverse.METHODS)
    svgd = next(r for r in rows if r.startswith("| `svgd`"))
    assert svgd.split("|")[-2].strip() == "—"  # no heterogeneous weight-space SVGD
