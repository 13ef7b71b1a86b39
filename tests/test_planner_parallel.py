"""The planner under tensor parallelism as the trainer runs it: sequence parallelism and the
vocabulary-parallel head. (Per-rank bytes against real ranks: tests/test_parallel.py and
tests/test_bf16.py; these are the planner's own decisions.)"""

from __future__ import annotations

import pytest

from planner_helpers import gpt4, workload  # noqa: F401 (gpt4 is a fixture)
from moray.parallel.config import ParallelConfig
from moray.platform.planner.activations import stage_extra_activation_bytes
from moray.platform.planner.layouts import Layout, best_variant, memory_of, structural_problem
from moray.platform.planner.memory import PipelineRank, estimate_memory, rank_params
from moray.platform.planner.steptime import estimate_step


def test_head_and_embedding_are_a_tensor_ranks_share(gpt4):
    """100,277 rows over 8 ranks: the fullest holds ceil(V / 8) = 12,535 of each table; serving's
    head stays whole (vocab_parallel=False)."""
    first_last = PipelineRank(layers=1, first=True, last=True)
    whole = rank_params(gpt4, 8, 16, first_last, pp=2)
    split = rank_params(gpt4, 8, 16, first_last, pp=2, vocab_parallel=True)
    assert whole.dense - split.dense == 2 * (100_277 - 12_535) * gpt4.d_model
    assert rank_params(gpt4, 1, 16, first_last, pp=2, vocab_parallel=True) == rank_params(gpt4, 1, 16, first_last, 2)


def test_sequence_parallel_activations_and_logits_are_split(gpt4):
    """tp 8 x pp 15 x ep 16, micro-batch 1 of 8,192 tokens: sequence parallelism cuts the
    activations of the last stage (norms, routing, the head's input) and the loss's probabilities
    are 1/8 of a 100k vocabulary on each tensor rank."""
    par = ParallelConfig(tp=8, pp=15, ep=16, dp=208, microbatches=36)
    kw = dict(micro_batch_size=1, seq_len=8192, dtype="bfloat16", stage=14)
    plain = estimate_memory(gpt4, par, **kw)
    sp = estimate_memory(gpt4, ParallelConfig(**{**par.to_dict(), "sequence_parallel": True}), **kw)
    assert sp.activations_bytes < 0.75 * plain.activations_bytes
    assert estimate_memory(gpt4, par, sequence_parallel=True, **kw) == sp  # the keyword wins over the config
    # The loss keeps float32 probabilities of this rank's 12,535 rows per token, not of 100,277.
    whole, split = (stage_extra_activation_bytes(gpt4, tp, 2, first=False, last=True) for tp in (1, 8))
    assert whole - split == 4 * (100_277 - 12_535)


def test_search_offers_sequence_parallelism_only_where_the_trainer_runs_it(gpt4):
    """The trainer splits each sequence evenly over tp: at seq_len 8,190 (not a multiple of 4 or 8)
    no variant has sequence parallelism, and a configured one is refused with the reason."""
    w = workload(gpt4)
    best, _ = best_variant(w, 8, 15, 16, 208)
    assert best is not None and best.layout.sequence_parallel
    odd = workload(gpt4, seq_len=8190)
    best_odd, leanest = best_variant(odd, 8, 15, 16, 208)
    assert not leanest.layout.sequence_parallel and (best_odd is None or not best_odd.layout.sequence_parallel)
    configured = workload(gpt4, seq_len=8190, sequence_parallel=True)
    assert "seq_len 8190 is not a multiple of it" in structural_problem(configured, 8, 15, 16, 8 * 15 * 208)
    assert structural_problem(configured, 2, 15, 16, 2 * 15 * 208) is None  # 8190 = 2 x 4095


def test_sequence_parallelism_saves_exchange_time_and_memory(gpt4):
    """Each tensor rank sends only its 1/tp of the routed rows and of the pipeline's activations."""
    w = workload(gpt4)
    plain = estimate_step(w, 8, 15, 16, 208, 1, True)
    sp = estimate_step(w, 8, 15, 16, 208, 1, True, sequence_parallel=True)
    assert sp.ep_comm_s == pytest.approx(plain.ep_comm_s / 8) and sp.pp_comm_s == pytest.approx(plain.pp_comm_s / 8)
    assert sp.tp_comm_s == plain.tp_comm_s  # all-gather + reduce-scatter move what the all-reduce moved
    lay = Layout(8, 15, 16, 208, 1, True, False)
    assert memory_of(w, Layout(8, 15, 16, 208, 1, True, True)).total_bytes < memory_of(w, lay).total_bytes
