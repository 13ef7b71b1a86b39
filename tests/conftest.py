"""Shared fixtures: the demo corpus prepared once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """configs/tiny.yaml's data (the stdlib demo corpus), tokenized into parquet shards."""
    from moray.data.preparation import ensure_prepared
    from moray.platform.config import load_config

    d = tmp_path_factory.mktemp("data")
    ensure_prepared(load_config("configs/tiny.yaml", [f"data.dir={d}"]), log=lambda *_: None)
    return d
