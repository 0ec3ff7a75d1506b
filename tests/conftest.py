"""Test settings: one torch thread (tiny ops on a 2-core machine are dominated by
thread start-up otherwise), no stray DIVERSE_DATA from the environment, and a
fresh cache of `auto` execution choices per test."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_user_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("DIVERSE_DATA", raising=False)
    monkeypatch.setenv("DIVERSE_CACHE_DIR", str(tmp_path / "cache"))
