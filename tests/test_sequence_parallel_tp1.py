"""parallel.sequence_parallel at tp 1 (one device, as bench/gpu.sh's pretrain step runs it on a
lent H200 with --sequence-parallel) changes nothing: the same bf16 steps, bit for bit."""

from __future__ import annotations

import pytest
import torch

from dist_utils import batches, spawn, tiny_config

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _steps(rank: int, world: int, data) -> dict:
    from moray.parallel import ParallelConfig, ParallelDims, TrainEngine

    out = {}
    for sp in (False, True):
        pcfg = ParallelConfig(microbatches=2, sequence_parallel=sp)
        engine = TrainEngine(tiny_config(), pcfg, ParallelDims.from_config(pcfg, world), rank, "cpu", seed=7,
                             dtype="bfloat16")
        results = [engine.step(tokens) for tokens in data]
        out[sp] = {"active": engine.sequence_parallel, "results": results, "weights": engine.full_state_dict()}
    return out


def test_sequence_parallel_is_a_no_op_at_tp_1():
    (got,) = spawn(_steps, 1, batches(2, global_batch=4, seq_len=15))  # odd: nothing to split, nothing refused
    assert got[True]["active"] is False
    assert got[True]["results"] == got[False]["results"]
    assert all(torch.equal(v, got[False]["weights"][k]) for k, v in got[True]["weights"].items())
