"""The planner's expert layouts, gradient reduction and recomputation, as the trainer runs them:
ep spanning tp x dp (etp 1), reduction overlapped with the backward, ZeRO-1's reduce-scatter and
all-gather, selective recomputation. (Against real ranks: tests/test_parallel.py.)"""

from __future__ import annotations

import pytest

from dist_utils import tiny_config
from planner_helpers import gpt4, workload  # noqa: F401 (gpt4 is a fixture)
from moray.parallel import LayoutError, ParallelConfig, ParallelDims
from moray.parallel.engine import check_schedule
from moray.platform.planner.layouts import Layout, best_variant, memory_of, search_layouts, structural_problem
from moray.platform.planner.memory import estimate_memory
from moray.platform.planner.steptime import estimate_step


def test_ep_may_span_tp_when_experts_are_whole(gpt4):
    """ep 16 does not divide dp 8, but divides tp 8 x dp 8 once experts are whole (etp 1); that
    needs sequence parallelism, which seq_len 8190 over tp 8 does not allow."""
    w = workload(gpt4)
    assert "does not divide dp 8" in structural_problem(w, 8, 15, 16, 8 * 15 * 8)
    assert structural_problem(w, 8, 15, 16, 8 * 15 * 8, etp=1) is None
    assert "does not divide tp 8" in structural_problem(w, 8, 15, 16, 8 * 15 * 8, etp=3)
    assert "needs sequence parallelism" in structural_problem(workload(gpt4, seq_len=8190), 8, 15, 16, 960, etp=1)
    # Whole experts cost tp times the expert weights per rank: with 2 blocks a stage (pp 60) they fit.
    best, leanest = best_variant(w, 8, 60, 16, 8, etp=1)
    assert best is not None and best.layout.sequence_parallel and best.layout.label == "tp8 pp60 ep16 etp1 dp8"
    assert best_variant(w, 8, 15, 16, 8, etp=1)[0] is None  # 8 blocks a stage do not


def test_every_layout_the_search_offers_is_one_the_trainer_accepts(gpt4):
    """What moray plan recommends passes the trainer's own checks: ParallelDims.validate (with the
    sequence parallelism the variant uses) and the schedule's microbatch rule."""
    w = workload(gpt4)
    result = search_layouts(w, 8 * 15 * 16)
    assert any(c.layout.expert_tp == 1 for c in result.feasible)  # etp 1 layouts are offered...
    assert any(c.layout.expert_tp == c.layout.tp for c in result.feasible)  # ...beside the classic ones
    for c in result.feasible:
        lay = c.layout
        dims = ParallelDims(lay.gpus, tp=lay.tp, pp=lay.pp, dp=lay.dp, ep=lay.ep, etp=lay.etp)
        dims.validate(gpt4, sequence_parallel=lay.sequence_parallel)
        check_schedule(ParallelConfig(tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp, microbatches=c.step.microbatches),
                       dims)
    with pytest.raises(LayoutError, match="needs parallel.sequence_parallel=true"):
        ParallelDims(128, tp=8, dp=16, ep=16, etp=1).validate(gpt4)


def test_an_expert_group_inside_a_node_exchanges_over_nvlink(gpt4):
    """ep 8: at etp = tp its ranks sit at stride 8 and span 8 nodes (network); at etp 1 they are 8
    consecutive ranks, one node. Whole experts also drop the row gather / reduce-scatter over tp."""
    w = workload(gpt4)
    strided = estimate_step(w, 8, 15, 8, 16, 1, True, sequence_parallel=True)
    packed = estimate_step(w, 8, 15, 8, 16, 1, True, sequence_parallel=True, etp=1)
    acc = w.accelerator
    assert packed.ep_comm_s == pytest.approx(strided.ep_comm_s * acc.inter_node_bandwidth / acc.intra_node_bandwidth)
    assert packed.tp_comm_s < strided.tp_comm_s


def test_overlapped_reduction_hides_all_but_the_last_bucket(gpt4):
    """Overlap: what the last microbatch's backward cannot hide, at least the last bucket; without
    it, all of the reduction; ZeRO-1 adds the parameter all-gather after the step."""
    kw = dict(tp=8, pp=15, ep=16, dp=16, micro_batch_size=1, activation_checkpointing=True, sequence_parallel=True)
    on = estimate_step(workload(gpt4), **kw)
    off = estimate_step(workload(gpt4, overlap_grad_reduce=False), **kw)
    assert on.dp_comm_s == off.dp_comm_s > 0 and on.param_gather_s > 0
    assert off.dp_comm_exposed_s == pytest.approx(off.dp_comm_s + off.param_gather_s)
    assert on.dp_comm_exposed_s < off.dp_comm_exposed_s and on.step_s < off.step_s
    zero0 = estimate_step(workload(gpt4, zero=0, overlap_grad_reduce=False), **kw)
    assert zero0.dp_comm_s == pytest.approx(2 * off.dp_comm_s) and zero0.param_gather_s == 0  # all-reduce = 2 x RS


@pytest.mark.parametrize("kw", [dict(), dict(n_experts=1), dict(n_kv_heads=4)])
def test_selective_recomputation_sits_between_none_and_full(kw):
    """Memory: recomputing attention keeps more than recomputing blocks, less than keeping all;
    every 2nd block keeps half the blocks whole. Time: the recomputed forward is smaller."""
    cfg = tiny_config(**kw)

    def memory(**p):
        return estimate_memory(cfg, ParallelConfig(tp=2, sequence_parallel=True, **p), micro_batch_size=2,
                               seq_len=16, dtype="float32", dp=1).activations_bytes

    plain, block = memory(), memory(activation_checkpointing=True)
    attention = memory(activation_checkpointing=True, recompute="attention")
    every2 = memory(activation_checkpointing=True, recompute_every=2)
    assert block < attention < plain and block < every2 < plain
    w = workload(cfg, seq_len=16)
    steps = {name: estimate_step(workload(cfg, seq_len=16, **extra), 2, 1, 1, 1, 1, ac, True).compute_s
             for name, extra, ac in (("none", {}, False), ("block", {}, True),
                                     ("attention", dict(recompute="attention"), True))}
    assert steps["none"] < steps["attention"] < steps["block"], steps
    assert memory_of(w, Layout(2, 1, 1, 1, 1, True, True)).recompute_bytes > 0


def test_zero1_shards_partial_gradient_weights_over_dp_x_tp(gpt4):
    """MQA's K/V (whole on every tensor rank) and, under sequence parallelism, the norms and the
    router have their optimizer state split over dp x tp, as zero.py keeps it."""
    par = ParallelConfig(tp=8, pp=15, ep=16, zero=1, sequence_parallel=True)
    est = estimate_memory(gpt4, par, 1, 8192, dp=16, stage=3)
    plain = estimate_memory(gpt4, ParallelConfig(tp=8, pp=15, ep=16, zero=1), 1, 8192, dp=16, stage=3)
    assert est.optimizer_bytes < plain.optimizer_bytes and est.weights_bytes == plain.weights_bytes
