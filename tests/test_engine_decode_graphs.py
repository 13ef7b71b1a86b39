"""The fixed-shape decode path that a GPU replays from CUDA graphs, checked on the CPU.

A CPU cannot capture a graph, but what can go wrong around one is here: padding a batch up to
a bucket, widening block tables to a bucket, pad rows writing into the scratch block, expert
counts of real rows only. `decode_graphs="static"` runs exactly the function a capture records
(forward_decode_static), at the same buckets, uncaptured. bench/gpu.sh captures it on a device.
"""

from __future__ import annotations

import pytest
import torch

from moray.model import ModelConfig, build_model
from moray.model.paged import SeqChunk, allocate_kv_caches, forward_paged, prepare_step
from moray.serve.engine.config import EngineConfig
from moray.serve.engine.core import EngineCore
from moray.serve.engine.decode_graphs import DecodeGraphs, default_sizes, why_not_capturable
from moray.serve.engine.sampling import SamplingParams

CFG = ModelConfig(vocab_size=320, d_model=128, n_layers=2, n_heads=4, n_kv_heads=1, ffn_hidden=128,
                  mlp="swiglu", n_experts=4, top_k=2, max_seq_len=256, init_std=0.1)
BS = 16


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=11).eval()


def _prefill(model, caches, prompts, tables):
    chunks = [SeqChunk(p, 0, t) for p, t in zip(prompts, tables)]
    tok, pos, batch = prepare_step(chunks, BS, CFG.max_seq_len, "cpu")
    with torch.inference_mode():
        return forward_paged(model, tok, pos, batch, caches)


def test_static_decode_equals_the_planned_step_and_leaves_other_blocks_alone(model):
    """3 sequences at different lengths in a bucket of 4 and a table 8 blocks wide: the logits and
    every real block of the cache equal the planned step's; only the scratch block differs."""
    g = torch.Generator().manual_seed(0)
    lens = [5, 40, 17]
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in lens]
    tables = [[3], [7, 1, 12], [4, 9]]  # enough for the prompt and one decode token each
    num_blocks = 16
    planned = allocate_kv_caches(model, num_blocks + 1, BS)
    _prefill(model, planned, prompts, tables)
    static = [(k.clone(), v.clone()) for k, v in planned]

    decode = [SeqChunk([int(t)], n, tb) for t, n, tb in zip([11, 22, 33], lens, tables)]
    tok, pos, batch = prepare_step(decode, BS, CFG.max_seq_len, "cpu")
    with torch.inference_mode():
        want = forward_paged(model, tok, pos, batch, planned)
    graphs = DecodeGraphs(model, static, BS, scratch_block=num_blocks, sizes=[1, 4, 8], mode="static",
                          max_blocks=16)
    assert graphs.accepts(decode) and graphs._bucket(decode) == (4, 4)
    got, counts = graphs.run(decode)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Pad rows wrote only the scratch block: every other slot is bit for bit the planned step's,
    # but the 3 decode slots, whose K/V come from a product over 4 rows instead of 3 (rounding).
    written = torch.tensor([tb[n // BS] * BS + n % BS for tb, n in zip(tables, lens)])
    others = torch.ones(num_blocks * BS, dtype=torch.bool)
    others[written] = False
    for (kp, vp), (ks, vs) in zip(planned, static):
        for a, b in ((ks, kp), (vs, vp)):
            a, b = a[:num_blocks].flatten(0, 1), b[:num_blocks].flatten(0, 1)  # (slots, nkv, hd)
            assert torch.equal(a[others], b[others])
            torch.testing.assert_close(a[written], b[written], rtol=1e-5, atol=1e-5)
    # expert counts are the 3 real rows' (k assignments each), not the padded batch's 4
    assert counts.shape == (CFG.n_layers, CFG.n_experts)
    assert counts.sum(-1).tolist() == [3 * CFG.top_k] * CFG.n_layers


def test_mixed_steps_and_oversized_batches_take_the_planned_path(model):
    graphs = DecodeGraphs(model, allocate_kv_caches(model, 5, BS), BS, 4, sizes=[1, 2], mode="static")
    assert not graphs.accepts([SeqChunk([1, 2], 0, [0])])  # a prefill chunk
    assert not graphs.accepts([SeqChunk([1], 3, [0], num_logits=1), SeqChunk([1, 2, 3], 4, [1], num_logits=3)])
    assert not graphs.accepts([SeqChunk([1], i, [i]) for i in range(3)])  # 3 > the largest bucket
    assert graphs.accepts([SeqChunk([1], 3, [0]), SeqChunk([2], 9, [1])])


def _run(model, mode, prompts, params):
    core = EngineCore(model, CFG, EngineConfig(kv_block_size=BS, kv_cache_blocks=48, max_num_seqs=8,
                                               max_batch_tokens=64, decode_graphs=mode))
    pending, done, experts, step = list(enumerate(prompts)), {}, [], 0
    while pending or core.has_unfinished_requests():
        if pending and step % 3 == 0:  # arrivals over time: decode-only steps between prefills
            i, p = pending.pop(0)
            core.add_request(f"r{i}", p, params)
        for out in core.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        experts.append(core.stats.last_expert_tokens)
        step += 1
    return [done[f"r{i}"] for i in range(len(prompts))], experts, core


def test_engine_outputs_and_expert_stats_unchanged_by_fixed_shape_decode(model):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (9, 30, 3, 51, 17, 24)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    off, experts_off, _ = _run(model, "off", prompts, params)
    static, experts_static, core = _run(model, "static", prompts, params)
    assert static == off
    assert experts_static == experts_off  # per step: the same assignments per expert
    graphs = core.executor.decode_graphs
    assert graphs.replays > 20  # most steps were pure decodes, served at fixed shapes
    assert {b for b, _ in graphs._shapes} <= set(default_sizes(8))
    # seeded sampling draws from the same logits: the same tokens
    sp = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=123, ignore_eos=True)
    assert _run(model, "static", prompts[:3], sp)[0] == _run(model, "off", prompts[:3], sp)[0]


def test_capture_is_refused_where_a_graph_cannot_hold_the_step(model):
    assert "CUDA device" in why_not_capturable(model, torch.device("cpu"))
    with pytest.raises(ValueError, match="serve.decode_graphs"):
        DecodeGraphs(model, allocate_kv_caches(model, 5, BS), BS, 4, sizes=[1], mode="cuda")
    # auto on the CPU: the planned path, and no scratch block taken from the cache
    core = EngineCore(model, CFG, EngineConfig(kv_block_size=BS, kv_cache_blocks=10))
    assert core.executor.decode_graphs is None and core.executor.kv_caches[0][0].shape[0] == 10
    with pytest.raises(ValueError, match="decode_graphs"):
        EngineConfig(decode_graphs="always")
    assert default_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert default_sizes(3) == [1, 2, 3]
