"""The model over a paged KV cache: a flat batch of chunks equals the dense forward, token for token."""

import math

import pytest
import torch

from moray.model import ModelConfig, build_model
from moray.model.paged import PagedBatch, allocate_kv_caches, forward_paged, moe_step_stats
from moray.serve.engine.executor import ModelExecutor, SeqChunk

BLOCK = 4
VOCAB = 97


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_hidden=96,
                n_experts=4, top_k=2, max_seq_len=64, init_std=0.1)  # init large enough for sharp attention
    return ModelConfig(**{**base, **kw})


def model_for(**kw):
    return build_model(tiny(**kw), seed=3).eval()


def dense_logits(model, tokens) -> torch.Tensor:
    """(len(tokens), vocab): the training forward on the whole sequence."""
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]


class Blocks:
    """A stand-in for the KV cache manager: hands out block ids in a given order."""

    def __init__(self, order):
        self.free = list(order)
        self.tables = {}

    def table(self, seq: int, length: int):
        t = self.tables.setdefault(seq, [])
        while len(t) * BLOCK < length:
            t.append(self.free.pop(0))
        return t


def step(model, kv, blocks, chunks):
    """chunks: (seq id, full tokens, start, end). Runs forward_paged with logits at every row."""
    tokens, pos, slots, qsl, lens, tables = [], [], [], [0], [], []
    for sid, full, a, b in chunks:
        t = blocks.table(sid, b)
        tokens += full[a:b]
        pos += range(a, b)
        slots += [t[p // BLOCK] * BLOCK + p % BLOCK for p in range(a, b)]
        qsl.append(len(tokens))
        lens.append(b)
        tables.append(t)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)  # -1 pads
    batch = PagedBatch(torch.tensor(qsl), torch.tensor(lens), bt, torch.tensor(slots),
                       torch.arange(len(tokens)))
    with torch.inference_mode():
        return forward_paged(model, torch.tensor(tokens), torch.tensor(pos), batch, kv)


def sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randint(0, VOCAB, (n,), generator=g).tolist() for i, n in enumerate([11, 20, 10, 14, 6, 9])}


def mixed_batch_error(model, order) -> float:
    """Step 1 writes earlier context; step 2 mixes a whole prompt, a middle chunk and decodes."""
    seqs = sequences()
    kv = allocate_kv_caches(model, 64, BLOCK)
    blocks = Blocks(order)
    step(model, kv, blocks, [(1, seqs[1], 0, 8), (2, seqs[2], 0, 9), (3, seqs[3], 0, 13),
                             (4, seqs[4], 0, 5), (5, seqs[5], 0, 8)])
    chunks = [(2, seqs[2], 9, 10),  # decodes interleaved with prefills, in no particular order
              (0, seqs[0], 0, 11),  # a whole prompt
              (3, seqs[3], 13, 14),
              (1, seqs[1], 8, 15),  # a middle chunk after an earlier one
              (4, seqs[4], 5, 6),
              (5, seqs[5], 8, 9)]
    out = step(model, kv, blocks, chunks)
    row, err = 0, 0.0
    for sid, full, a, b in chunks:
        want = dense_logits(model, full[:b])[a:b]
        err = max(err, (out[row:row + b - a] - want).abs().max().item())
        row += b - a
    return err


# ---------------------------------------------------------------- forward_paged


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])  # MQA, GQA, MHA
def test_mixed_flat_batch_equals_dense_forward(n_kv_heads):
    model = model_for(n_kv_heads=n_kv_heads)
    assert mixed_batch_error(model, range(64)) < 1e-5
    assert dense_logits(model, sequences()[0]).abs().max() > 0.5  # the comparison is not of near-zeros


def test_scrambled_block_tables_give_the_same_logits():
    model = model_for()
    order = torch.randperm(64, generator=torch.Generator().manual_seed(7)).tolist()
    assert order[:8] != list(range(8))
    assert mixed_batch_error(model, order) < 1e-5


def test_writes_land_in_their_slots_and_reads_cross_block_boundaries():
    model = model_for()
    full = sequences()[1]  # 20 tokens over 5 blocks
    kv = allocate_kv_caches(model, 16, BLOCK)
    blocks = Blocks([9, 2, 14, 5, 11])
    # Chunks that start and end mid-block: 0..3, 3..10 (spans three blocks), then decodes past 2 boundaries.
    pieces = [(0, 3), (3, 10)] + [(p, p + 1) for p in range(10, 20)]
    got = torch.cat([step(model, kv, blocks, [(0, full, a, b)]) for a, b in pieces])
    assert (got - dense_logits(model, full)).abs().max().item() < 1e-5
    used = set(blocks.tables[0])
    for k, v in kv:
        for b in range(16):
            written = k[b].abs().sum() > 0
            assert written == (b in used), b  # nothing written outside the sequence's blocks
        # K in the cache at position p is the rotated key of token p: one check that p lands at its slot.
        assert torch.equal(k[blocks.tables[0][4]][3] != 0, torch.ones_like(k[0][0], dtype=torch.bool))


def test_logits_only_at_requested_rows_and_moe_stats():
    model = model_for()
    seqs = sequences()
    kv = allocate_kv_caches(model, 32, BLOCK)
    tokens = seqs[0] + seqs[4]
    batch = PagedBatch(torch.tensor([0, 11, 17]), torch.tensor([11, 6]),
                       torch.tensor([[0, 1, 2], [3, 4, -1]], dtype=torch.int32),
                       torch.tensor(list(range(11)) + list(range(12, 18))), torch.tensor([10, 16]))
    with torch.inference_mode():
        out = forward_paged(model, torch.tensor(tokens), torch.tensor(list(range(11)) + list(range(6))), batch, kv)
    stats = moe_step_stats(model)  # before any other forward overwrites last_stats
    assert out.shape == (2, VOCAB)
    assert (out[0] - dense_logits(model, seqs[0])[-1]).abs().max() < 1e-5
    assert (out[1] - dense_logits(model, seqs[4])[-1]).abs().max() < 1e-5
    assert stats.expert_tokens.shape == (2, 4)
    assert stats.expert_tokens.sum(-1).tolist() == [17 * 2, 17 * 2]  # every token, top-2
    assert stats.experts_touched == (stats.expert_tokens > 0).sum(-1).tolist()


def test_bf16_cache_stays_close():
    model = model_for()
    seqs = sequences()
    ex = ModelExecutor(model, 16, BLOCK, dtype=torch.bfloat16)
    assert ex.kv_caches[0][0].dtype == torch.bfloat16
    res = ex.execute([SeqChunk(seqs[0], 0, [0, 1, 2], True)])
    assert (res.logits[0] - dense_logits(model, seqs[0])[-1]).abs().max() < 5e-2


# ---------------------------------------------------------------- executor


def test_executor_prefill_then_batched_decodes_equal_dense():
    model = model_for()
    seqs = {i: s + s for i, s in sequences().items()}  # at least 12 tokens each
    ex = ModelExecutor(model, 64, BLOCK)
    tables = {i: list(range(8 * i, 8 * i + 8))[::-1] for i in seqs}  # reversed: non-contiguous
    first = ex.execute([SeqChunk(s[:5], 0, tables[i], True) for i, s in seqs.items()])
    want_first = torch.stack([dense_logits(model, s[:5])[-1] for s in seqs.values()])
    assert (first.logits - want_first).abs().max() < 1e-5
    err = 0.0
    for p in range(5, 12):  # every sequence decodes together, across a block boundary
        res = ex.execute([SeqChunk([s[p]], p, tables[i], True) for i, s in seqs.items()])
        want = torch.stack([dense_logits(model, s[:p + 1])[-1] for s in seqs.values()])
        err = max(err, (res.logits - want).abs().max().item())
        assert res.expert_tokens.shape == (2, 4) and res.expert_tokens.sum().item() == 2 * 2 * len(seqs)
        assert res.experts_touched == (res.expert_tokens > 0).sum(-1).tolist()
        assert res.seconds > 0
    assert err < 1e-5


def test_executor_logits_only_for_chunks_that_need_them():
    model = model_for()
    s = sequences()[1]
    ex = ModelExecutor(model, 16, BLOCK)
    res = ex.execute([SeqChunk(s[:8], 0, [3, 4], False), SeqChunk(s[:3], 0, [5], True)])
    assert res.logits.shape == (1, VOCAB)
    res = ex.execute([SeqChunk(s[8:12], 8, [3, 4, 6], True)])  # the first sequence's next chunk
    assert (res.logits[0] - dense_logits(model, s[:12])[-1]).abs().max() < 1e-5


def test_executor_sizes_and_errors():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    ex = ModelExecutor(model, 8, BLOCK)
    assert ex.kv_bytes_per_token == 2 * 2 * 1 * 16 * 4
    assert ModelExecutor.blocks_for_budget(cfg, 16, 2**20, torch.bfloat16) == 2**20 // (2 * 2 * 16 * 2 * 16)
    with pytest.raises(ValueError, match="holds no block"):
        ModelExecutor.blocks_for_budget(cfg, 16, 100, torch.float32)
    with pytest.raises(ValueError, match="block table of 1 blocks"):
        ex.execute([SeqChunk([1] * 5, 0, [0], True)])
    with pytest.raises(ValueError, match="max_seq_len 64"):
        ex.execute([SeqChunk([1], 64, list(range(8)) * 3, True)])
    assert ex.execute([]).logits.shape == (0, VOCAB)


def test_dense_model_has_no_expert_stats():
    model = build_model(tiny(n_experts=1), seed=0).eval()
    ex = ModelExecutor(model, 8, BLOCK)
    res = ex.execute([SeqChunk([1, 2, 3], 0, [0], True)])
    assert res.expert_tokens is None and res.experts_touched == []
    assert math.isfinite(res.logits.sum().item())


@pytest.mark.parametrize("mlp,fuse,dtype", [("swiglu", True, torch.bfloat16), ("swiglu", False, torch.float32),
                                            ("gelu", False, torch.float32)])
def test_prepacked_expert_products_equal_the_grouped_product(mlp, fuse, dtype):
    """Serving's per-expert products on oneDNN-packed weights (layout.prepack_experts) against the
    grouped product on the same weights, empty experts included; autograd keeps the grouped one."""
    from moray.model.moe import GroupedExperts
    from moray.serve.engine.layout import column_major_experts, fuse_projections, prepack_experts

    torch.manual_seed(0)
    experts = GroupedExperts(4, 32, 48, mlp)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    experts.to(dtype).requires_grad_(False)
    if dtype == torch.bfloat16:
        column_major_experts(experts)
    if fuse:
        fuse_projections(experts)
    counts = torch.tensor([3, 0, 6, 1])
    x = torch.randn(int(counts.sum()), 32, dtype=dtype)
    with torch.inference_mode():
        want = experts(x, counts)  # not packed yet: the grouped product
        assert prepack_experts(experts) == 1 and experts.serve_products is not None
        assert set(experts.serve_products) == ({"w13", "w2"} if fuse else {"w1", "w3", "w2"} if mlp == "swiglu"
                                               else {"w1", "w2"})
        got = experts(x, counts)
        empty = experts(x[:0], torch.zeros(4, dtype=torch.long))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    assert empty.shape == (0, 32)
    calls = []
    experts.serve_products = {k: [lambda a, f=f: calls.append(1) or f(a) for f in v]
                              for k, v in experts.serve_products.items()}
    with torch.enable_grad():
        experts(x, counts)
    assert not calls  # with autograd on (training, never serving) the grouped product runs
    with torch.inference_mode():
        experts(x, counts)
    assert len(calls) == 3 * (2 if fuse or mlp == "gelu" else 3)  # three experts with rows


def test_executor_prepacks_experts_on_the_cpu_only_where_it_can():
    from moray.serve.engine.layout import can_prepack

    assert not can_prepack(torch.device("cpu"), torch.float16)
    assert not can_prepack(torch.device("meta"), torch.bfloat16)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, ffn_hidden=48,
                      n_experts=4, top_k=2, max_seq_len=64)
    model = build_model(cfg).to(torch.bfloat16)
    ModelExecutor(model, num_blocks=8, block_size=4)
    packed = [m.feed_forward.experts.serve_products is not None for m in model.layers.values()]
    assert packed == [True, True]  # torch's CPU wheels ship oneDNN: serving on the CPU always packs


def test_prepacked_dense_products_equal_the_linear_ones():
    from moray.serve.engine.layout import fuse_projections, prepack_linears

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=1, ffn_hidden=48,
                      n_experts=4, top_k=2, max_seq_len=64)
    model = build_model(cfg).requires_grad_(False)
    fuse_projections(model)
    att = model.layers["0"].attention
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        want_head, want_wo, want_qkv = model.output(x), att.wo(x), torch.nn.functional.linear(x, att.serve_wqkv)
        assert prepack_linears(model) == 1 + 3  # the q/k/v stack; the head, wo, the router
        assert "forward" not in att.wq.__dict__  # stacked: the paged step reads serve_wqkv_product
        torch.testing.assert_close(model.output(x), want_head, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(att.wo(x), want_wo, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(att.serve_wqkv_product(x), want_qkv, rtol=1e-5, atol=1e-5)
        assert model.output(x[:0]).shape == (0, 5, 64)
        assert prepack_linears(model) == 1  # already packed linears are left alone
