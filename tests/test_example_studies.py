"""``examples/_study.py``: a run folder's figures and the mean ± sd table of the
hypernetwork and mutual-BNN studies, on hand-made metrics."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
spec = importlib.util.spec_from_file_location("_study", EXAMPLES / "_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def _run(folder: Path, accuracy: float, seconds: float | None) -> Path:
    folder.mkdir()
    metrics = {"accuracy": accuracy, "member_accuracy": [0.5, 0.7], "nll": 0.4, "ece": 0.02,
               "disagreement": 0.1,
               "cka": {"layers": {"classifier.act4": {"mean": 0.9}}},
               "ood": {"digits": {"auroc": 0.95}, "synthetic": {"auroc": 0.8}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if seconds is not None:
        (folder / "study_seconds.txt").write_text(f"{seconds}\n")
    return folder


def test_figures_read_the_metrics_and_mark_what_is_missing(tmp_path):
    f = study.figures(_run(tmp_path / "a", 0.8, 12.0))
    assert f["accuracy"] == 0.8 and math.isclose(f["member accuracy"], 0.6)
    assert f["CKA act4"] == 0.9 and math.isnan(f["CKA act3"])
    assert (f["auroc digits"], f["auroc synthetic"], f["seconds"]) == (0.95, 0.8, 12.0)
    assert math.isnan(study.figures(_run(tmp_path / "b", 0.8, None))["seconds"])


def test_table_gives_mean_and_sample_sd_per_variant(tmp_path):
    runs = [study.figures(_run(tmp_path / f"s{i}", acc, 10.0 * (i + 1)))
            for i, acc in enumerate((0.80, 0.82, 0.87))]
    lines = study.table({"x": runs, "one": runs[:1]}).splitlines()
    assert lines[0].startswith("| variant | n | accuracy | member accuracy |")
    # mean 0.83, sd (ddof 1) sqrt(((-.03)² + (-.01)² + .04²) / 2) = 0.0361
    assert lines[2].startswith("| x | 3 | 0.8300 ± 0.0361 | 0.6000 ± 0.0000 |")
    assert lines[2].endswith("| 20 ± 10 |")
    assert lines[3].startswith("| one | 1 | 0.8000 | 0.6000 |")


def test_table_only_tabulates_finished_runs_and_trains_nothing(tmp_path, monkeypatch, capsys):
    _run(tmp_path / "a-s0", 0.80, 1.0)
    _run(tmp_path / "a-s2", 0.84, 1.0)  # seed 1 never finished; b never ran
    monkeypatch.setattr(study, "train", lambda *args: pytest.fail("trained"))
    monkeypatch.setattr("sys.argv", ["study", "--seeds", "0", "1", "2", "--out", str(tmp_path),
                                     "--table-only"])
    study.main("doc", {"a": ("a.toml", []), "b": ("b.toml", [])}, "title", seeds=[0],
               epochs=1, out="unused")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "title, 1 epoch(s), seeds [0, 1, 2]"
    assert out[3].startswith("| a | 2 | 0.8200 ± 0.0283 |") and len(out) == 4
    monkeypatch.setattr("sys.argv", ["study", "--variants", "b", "--out", str(tmp_path),
                                     "--table-only"])
    with pytest.raises(SystemExit, match="no finished runs"):
        study.main("doc", {"b": ("b.toml", [])}, "title", seeds=[0], epochs=1, out="unused")
