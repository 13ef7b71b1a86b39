"""Layouts without processes: what fits, what does not and why, stage balancing, the bubble."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_utils import tiny_config
from moray.parallel import LayoutError, ParallelConfig, ParallelDims
from moray.parallel.engine import check_schedule
from moray.parallel.pipeline import bubble_fraction, head_cost, layer_cost, partition_layers, stage_ids
from moray.parallel.vocab_parallel import vocab_range

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("dims,needle", [
    (ParallelDims(6, tp=2, pp=2, dp=1), "world size must be a multiple of 4"),
    (ParallelDims(8, tp=2, pp=2, dp=1), "use dp = 2"),
    (ParallelDims(4, dp=4, ep=3), "ep in [1, 2, 4] fits dp 4"),
    (ParallelDims(6, dp=6, ep=3), "ep 3 must divide n_experts 4; with dp 6, ep in [1, 2] fits"),
    (ParallelDims(8, pp=8), "8 pipeline stages for 4 layers: every stage needs a layer; use pp in 1..4"),
    (ParallelDims(3, tp=3), "tp 3 must divide n_heads 4, ffn_hidden 256; tp in [1, 2, 4] fits this model"),
])
def test_bad_layout_says_what_would_fit(dims, needle):
    with pytest.raises(LayoutError) as err:
        dims.validate(tiny_config())
    assert needle in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(LayoutError) as err:
        ParallelDims(16, pp=8, dp=2, ep=3).validate(tiny_config())
    msg = str(err.value)
    assert "ep 3 must divide dp 2" in msg and "8 pipeline stages for 4 layers" in msg


def test_mqa_replicates_kv_over_tensor_ranks():
    ParallelDims(4, tp=4).validate(tiny_config())  # 1 KV head, 4 tensor ranks: fine
    gqa = tiny_config(n_heads=8, n_kv_heads=4, d_model=128)
    ParallelDims(2, tp=2).validate(gqa)  # KV heads split
    ParallelDims(8, tp=8).validate(gqa)  # 4 KV heads, 8 ranks: each keeps the head its queries share
    assert ParallelDims.valid_tp(tiny_config(n_heads=8, n_kv_heads=8)) == [1, 2, 4, 8]


def test_dense_model_has_no_experts_to_spread():
    with pytest.raises(LayoutError, match="needs experts but the model is dense"):
        ParallelDims(2, dp=2, ep=2).validate(tiny_config(n_experts=1))


def test_interleaved_needs_a_layer_per_virtual_stage():
    with pytest.raises(LayoutError, match="pp x virtual_stages <= 4"):
        ParallelDims(2, pp=2).validate(tiny_config(), virtual_stages=4)


def test_schedule_needs_enough_microbatches():
    dims = ParallelDims(4, pp=4)
    with pytest.raises(LayoutError, match="1F1B needs at least pp = 4 microbatches"):
        check_schedule(ParallelConfig(pp=4, microbatches=2), dims)
    with pytest.raises(LayoutError, match="multiple of pp"):
        check_schedule(ParallelConfig(pp=4, microbatches=6, schedule="interleaved_1f1b"), dims)
    check_schedule(ParallelConfig(pp=4), dims)  # default: 2 * pp microbatches


def test_coordinates_put_tensor_ranks_innermost_and_experts_inside_dp():
    dims = ParallelDims(16, tp=2, pp=2, dp=4, ep=2)
    assert dims.edp == 2
    c = dims.coords(13)  # 13 = (1 * 4 + 2) * 2 + 1
    assert (c.pp, c.dp, c.tp, c.ep, c.edp) == (1, 2, 1, 0, 1)
    assert dims.dp_rank(13) == 2 and dims.pp_rank(13) == 1
    assert dims.describe() == {"world_size": 16, "pp": 2, "dp": 4, "tp": 2, "ep": 2}
    assert ParallelDims.from_config(ParallelConfig(tp=2, pp=2, ep=2), 16) == dims


def test_stages_balance_cost_with_embedding_and_head():
    cfg = tiny_config()
    assert partition_layers(cfg, 2) == [range(0, 2), range(2, 4)]
    assert [len(r) for r in partition_layers(cfg, 3)] == [1, 2, 1]  # the ends pay for embedding and head
    big_vocab = tiny_config(vocab_size=100_000, n_layers=8, n_experts=1)
    assert 2 * 128 * 100_000 > layer_cost(big_vocab, 256)  # the head costs more than a block here...
    ranges = partition_layers(big_vocab, 4)
    assert [len(r) for r in ranges] == [1, 3, 3, 1]  # ...so the end stages get fewer blocks
    assert sum(len(r) for r in ranges) == 8 and ranges[0].start == 0 and ranges[-1].stop == 8


def test_interleaved_stage_ids_and_bubble():
    assert stage_ids(1, 4, 2) == [1, 5]
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, virtual_stages=2) == pytest.approx(3 / 19)


def test_engine_needs_a_process_group():
    from moray.parallel import TrainEngine

    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        TrainEngine(tiny_config(), ParallelConfig(), ParallelDims(1), rank=0, device="cpu")


def test_vocabulary_rows_follow_torch_chunk():
    """Rank r starts at r * ceil(V / tp): even splits, and uneven ones (the seed's 100,277 rows
    over 8 ranks) where the last rank holds fewer, as DTensor's Shard(0) places them."""
    import torch

    for vocab, tp in ((320, 2), (321, 2), (100_277, 8), (10, 4)):
        ranges = [vocab_range(vocab, r, tp) for r in range(tp)]
        sizes = [len(c) for c in torch.arange(vocab).chunk(tp)]
        assert [e - s for s, e in ranges] == sizes and ranges[0][0] == 0 and ranges[-1][1] == vocab
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(tp - 1))
    assert vocab_range(100_277, 7, 8) == (87_745, 100_277)  # 12,532 rows; the others 12,535


def test_a_tensor_rank_without_vocabulary_rows_is_refused():
    with pytest.raises(LayoutError, match="leaves the last tensor rank no vocabulary rows"):
        ParallelDims(4, tp=4).validate(tiny_config(vocab_size=9))  # chunks of 3: 3, 3, 3, 0
    ParallelDims(4, tp=4).validate(tiny_config(vocab_size=10))  # 3, 3, 3, 1


def test_balancer_costs_one_tensor_rank_with_the_head_at_its_vocabulary_share():
    """The seed's layout, tp 8 x pp 15 (120 layers, 8 per stage): on one tensor rank the last
    stage's head costs 0.61 of a block, so it runs 1.08x the middle stages; a head whole on every
    tensor rank (what the trainer had before the head was vocabulary-parallel) cost 4.9 blocks
    there, 1.61x the middle stages."""
    from moray.platform.config import load_config

    cfg = load_config(CONFIGS / "gpt4.yaml").model
    tp, pp = 8, 15
    block = layer_cost(cfg, cfg.max_seq_len, tp, sequence_parallel=True)
    ranges = partition_layers(cfg, pp, tp=tp, sequence_parallel=True)
    assert [len(r) for r in ranges] == [8] * 15

    def last_over_middle(head: float) -> float:
        return (len(ranges[-1]) * block + head) / (len(ranges[7]) * block)

    assert last_over_middle(head_cost(cfg, tp)) == pytest.approx(1.077, abs=1e-3)
    assert last_over_middle(head_cost(cfg, 1)) == pytest.approx(1.612, abs=1e-3)
    # A block's cost on one rank is not a tp-th of the whole: MQA's K/V head runs on every rank.
    assert layer_cost(cfg, 8192, tp) > layer_cost(cfg, 8192) / tp
    # Serving's call (tp 1: its head is whole) keeps the old split.
    assert partition_layers(cfg, pp) == [range(8 * s, 8 * s + 8) for s in range(pp)]


def test_sequence_parallel_needs_seq_len_a_multiple_of_tp():
    from moray.platform.config import ConfigError, load_config

    base = ["parallel.tp=2", "parallel.pp=1", "parallel.ep=1", "cluster.num_workers=2",
            "parallel.sequence_parallel=true"]
    load_config(CONFIGS / "tiny.yaml", base + ["train.seq_len=128"])
    with pytest.raises(ConfigError, match=r"train.seq_len \(127\) is not a multiple of 2"):
        load_config(CONFIGS / "tiny.yaml", base + ["train.seq_len=127"])
    load_config(CONFIGS / "tiny.yaml", base[:-1] + ["train.seq_len=127"])  # without it, any length runs
    with pytest.raises(ConfigError, match="parallel.sequence_paralel: unknown key"):
        load_config(CONFIGS / "tiny.yaml", ["parallel.sequence_paralel=true"])


def test_expert_layout_spans_tensor_and_data_ranks_at_etp_1():
    """A stage's dp x tp ranks regroup as edp x ep x etp (dims.py). etp = tp is the classic layout
    (an expert group at stride tp inside dp); at etp 1 an expert group is ep consecutive ranks."""
    classic = ParallelDims(8, tp=2, dp=4, ep=2)
    assert classic.etp == 2 and classic.edp == 2 and classic == ParallelDims(8, tp=2, dp=4, ep=2, etp=2)
    assert [classic.coords(r).ep for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]  # stride tp
    packed = ParallelDims(8, tp=2, dp=4, ep=4, etp=1)
    packed.validate(tiny_config(), sequence_parallel=True)
    assert packed.edp == 2 and packed.describe()["etp"] == 1 and "etp" not in classic.describe()
    assert [packed.coords(r).ep for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]  # consecutive, across tp
    assert [packed.coords(r).edp for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ParallelDims.from_config(ParallelConfig(tp=2, ep=4, etp=1), 8) == packed


@pytest.mark.parametrize("dims,sp,needle", [
    (ParallelDims(4, tp=2, dp=2, ep=4), True, "ep 4 must divide dp 2 (with etp = tp"),
    (ParallelDims(4, tp=2, dp=2, ep=4), True, "or etp 1 (with sequence parallelism) spreads them"),
    (ParallelDims(4, tp=2, dp=2, ep=4, etp=1), False, "etp 1 < tp 2 needs parallel.sequence_parallel=true"),
    (ParallelDims(8, tp=4, dp=2, ep=4, etp=3), True, "etp 3 must divide tp 4"),
    (ParallelDims(8, tp=2, dp=4, ep=3, etp=1), True, "ep 3 x etp 1 must divide dp 4 x tp 2"),
    (ParallelDims(6, tp=2, dp=3, ep=3, etp=1), True, "ep 3 must divide n_experts 4; with dp 3 x tp 2 / etp 1, "
                                                     "ep in [1, 2] fits"),
])
def test_bad_expert_layout_says_what_would_fit(dims, sp, needle):
    with pytest.raises(LayoutError) as err:
        dims.validate(tiny_config(), sequence_parallel=sp)
    assert needle in str(err.value)


def test_new_parallel_keys_fail_in_the_driver_naming_the_key():
    from moray.platform.config import ConfigError, load_config

    for override, needle in (("parallel.recompute_every=0", "parallel.recompute_every 0"),
                             ("parallel.recompute=attn", "parallel.recompute: Input should be 'block' or 'attention'"),
                             ("parallel.grad_bucket_mb=0", "parallel.grad_bucket_mb 0"),
                             ("parallel.etp=0", "parallel.etp 0")):
        with pytest.raises(ConfigError, match=needle):
            load_config(CONFIGS / "tiny.yaml", [override])
    cfg = load_config(CONFIGS / "tiny.yaml", ["parallel.tp=2", "parallel.pp=1", "parallel.ep=2", "parallel.etp=1",
                                              "cluster.num_workers=2", "parallel.sequence_parallel=true"])
    from moray.platform.controller import validate_layout
    assert validate_layout(cfg) == 2
    with pytest.raises(ConfigError, match="needs parallel.sequence_parallel=true"):
        validate_layout(load_config(CONFIGS / "tiny.yaml", ["parallel.tp=2", "parallel.pp=1", "parallel.ep=2",
                                                            "parallel.etp=1", "cluster.num_workers=2"]))


def test_zero_pieces_follow_dtensor_shards():
    """ZeRO-1 pieces (grad_reduce.nested_chunk) are what DTensor's Shard places on each rank, nested
    over dp x tp as the partial-gradient weights are: torch.chunk of torch.chunk."""
    import torch

    from moray.parallel.grad_reduce import nested_chunk

    for n, dp, tp in ((10, 2, 2), (7, 4, 1), (3, 4, 2), (128, 2, 4)):
        rows = torch.arange(n)
        for i, part in enumerate(list(rows.chunk(dp)) + [rows[:0]] * (dp - len(rows.chunk(dp)))):
            pieces = list(part.chunk(tp)) + [part[:0]] * (tp - len(part.chunk(tp)))
            for j, piece in enumerate(pieces):
                start, length = nested_chunk(n, (dp, tp), (i, j))
                assert length == len(piece) and (length == 0 or start == piece[0].item()), (n, dp, tp, i, j)
