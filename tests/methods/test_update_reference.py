"""Every method's update equals the stored one of the commit before issue 14's rewrite
(``tests/methods/update_reference.py``: fixed parameters, batch and seed, float64),
to float64 round-off — the faster formulations change the cost, not the numbers."""

import math

import pytest
import torch
from update_reference import CASES, compute, load

STORED, META = load()


@pytest.mark.parametrize("case", list(CASES))
def test_update_equals_the_stored_reference(case):
    tensors, logs = compute(case)
    assert set(tensors) == {k for k in STORED if k.startswith(f"{case}/")}
    for key, want in STORED.items():
        if key.startswith(f"{case}/"):
            got = tensors[key]
            scale = max(want.abs().max().item(), 1e-300)
            # round-off of a reorganized float64 computation: relative to the tensor's scale
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11 * scale, msg=key)
    stored_logs = META["logs"][case]
    assert set(logs) == set(stored_logs)
    for key, want in stored_logs.items():
        assert math.isclose(logs[key], want, rel_tol=1e-9, abs_tol=1e-12), (case, key)


@pytest.mark.parametrize("case", ["forde-pca", "forde-cnn"])
def test_forde_without_the_diagnostics_takes_the_same_step(case, monkeypatch):
    # default diagnostics_every = 10 at step 25: one fused backward, the same update
    model, method, members = CASES[case]
    monkeypatch.setitem(CASES, case, (model, {**method, "diagnostics_every": 10}, members))
    tensors, logs = compute(case)
    for key, got in tensors.items():
        want = STORED[key]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11 * want.abs().max().item())
    assert "driving_norm" not in logs and "disagreement" in logs


def test_the_reference_detects_a_changed_update():
    tensors, _ = compute("svgd-rbf")
    key = next(k for k in tensors if k.startswith("svgd-rbf/grad."))
    changed = tensors[key] * (1 + 1e-8)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(changed, STORED[key], rtol=1e-10,
                                   atol=1e-11 * STORED[key].abs().max().item())
