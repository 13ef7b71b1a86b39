"""Shared by the planner's layout tests: the seed's model and a GPT-4-scale workload on A100s."""

from __future__ import annotations

from pathlib import Path

import pytest

from moray.platform.config import load_config
from moray.platform.planner.catalogue import get_accelerator
from moray.platform.planner.workload import Workload

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def gpt4():
    return load_config(CONFIGS / "gpt4.yaml").model


def workload(cfg, seq_len: int = 8192, **kw) -> Workload:
    return Workload(model=cfg, accelerator=get_accelerator("a100-40gb"), gpus_per_node=8, seq_len=seq_len,
                    micro_batch_size=1, batch_tokens=60_000_000, **kw)
