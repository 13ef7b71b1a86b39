"""The model's forward for one serving step: a flat batch over a paged KV cache.

Every sequence in the step contributes a chunk of tokens at its own positions
(a whole prompt, a middle chunk of one, or a single decode token: vLLM V1 has
no prefill/decode modes, and neither does this). The tokens of all chunks are
laid end to end, T in all; each layer writes their keys and values into the
paged cache at `slot_mapping`, then each chunk attends to exactly its
sequence's context (seq_len tokens, causal within the chunk) read back through
its block table.

Legend: T = tokens in the step, S = sequences, Sd = decode sequences (one
token each), nh = query heads, nkv = KV heads, g = nh // nkv, hd = head_dim,
bs = block_size, L = padded context length of the decodes.

Cache layout per layer: K and V, each (num_blocks, bs, nkv, hd); slot
`block_id * bs + offset` is row `slot` of the (num_blocks * bs, nkv, hd) view.
One KV head (MQA) makes a block small.

The decode path is batched: all single-token sequences gather their blocks
into one padded (Sd, nkv, L, hd) tensor with a mask and run one attention;
the g query heads of a KV group are folded into the query-length dimension,
so MQA/GQA needs no repeated K/V. Short chunks (2..SHORT_CHUNK tokens: a
speculative verification's last token and its drafts) are batched the same way,
padded to the longest of them with a causal mask offset per sequence. Longer
prefill chunks loop per sequence, each one SDPA call with an explicit causal
mask offset by the context before the chunk.
Everything host-side (which sequence is a decode, the masks, the gathered
block ids) is planned once per step and shared by all layers.

This walks the model's own modules, so it shares the weights and leaves the
training forward untouched; MoE layers see the flat tokens as (1, T, D)
(routing is per token, so batching does not change it while the layer is
dropless: with a capacity factor, which tokens drop depends on the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from moray.model.layers import apply_rotary
from moray.model.moe import MoE
from moray.model.transformer import Transformer

KVPair = Tuple[torch.Tensor, torch.Tensor]  # K, V: each (num_blocks, bs, nkv, hd)
SHORT_CHUNK = 16  # chunks of 2..this many tokens attend in one padded batch


@dataclass
class PagedBatch:
    """Where each chunk of a flat batch sits: the attention metadata of one step (vLLM's names)."""

    query_start_loc: torch.Tensor  # (S+1,) int: chunk i is tokens [qsl[i], qsl[i+1]) of the flat batch
    seq_lens: torch.Tensor  # (S,) int: context of sequence i after this step's tokens
    block_tables: torch.Tensor  # (S, max_blocks) int32, padded (pad entries are never attended)
    slot_mapping: torch.Tensor  # (T,) int64: block_id * bs + offset where token t's K/V is written
    logits_indices: torch.Tensor  # (N,) int64: flat rows whose logits are wanted
    # Host copies of query_start_loc and seq_lens, so planning a step on a GPU needs no
    # device-to-host sync; `to()` keeps them. None = read the device tensors once per step.
    query_start_loc_cpu: Optional[torch.Tensor] = field(default=None, repr=False)
    seq_lens_cpu: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def to(self, device) -> "PagedBatch":
        qsl_cpu = self.query_start_loc_cpu if self.query_start_loc_cpu is not None else self.query_start_loc.cpu()
        sl_cpu = self.seq_lens_cpu if self.seq_lens_cpu is not None else self.seq_lens.cpu()
        return PagedBatch(
            self.query_start_loc.to(device, non_blocking=True), self.seq_lens.to(device, non_blocking=True),
            self.block_tables.to(device, non_blocking=True), self.slot_mapping.to(device, non_blocking=True),
            self.logits_indices.to(device, non_blocking=True), qsl_cpu, sl_cpu)


@dataclass
class SeqChunk:
    """One sequence's part of a step: its tokens at positions start_pos.. and where its KV lives."""

    token_ids: List[int]
    start_pos: int  # position of token_ids[0]; tokens before it are already in the cache
    block_table: List[int]  # block ids holding positions 0.. of this sequence, in order
    needs_logits: bool = True  # False for a prefill chunk that does not reach the prompt's end
    # Rows of logits wanted, at the chunk's last num_logits tokens (when needs_logits): 1 for a
    # decode or a prompt's end, 1 + k for speculative verification (the last token and k drafts).
    num_logits: int = 1


def prepare_step(chunks: List[SeqChunk], block_size: int, max_len: int, device):
    """Host-side: the flat tokens, positions and PagedBatch of a step, on `device`.

    A function of the chunks alone, so every pipeline stage of a Ray gang builds the same batch
    from the same chunk list (moray/parallel/serving.py) without shipping tensors between them."""
    bs = block_size
    tokens, positions, slots, qsl, seq_lens, logits_idx = [], [], [], [0], [], []
    width = max([len(c.block_table) for c in chunks] + [1])
    for i, c in enumerate(chunks):
        n = c.start_pos + len(c.token_ids)
        if n > max_len:
            raise ValueError(f"chunk {i}: positions up to {n - 1} are past the model's context "
                             f"(max_seq_len {max_len})")
        if len(c.block_table) * bs < n:
            raise ValueError(f"chunk {i}: a block table of {len(c.block_table)} blocks holds "
                             f"{len(c.block_table) * bs} tokens but the sequence reaches {n}; allocate first")
        if c.needs_logits and not 1 <= c.num_logits <= len(c.token_ids):
            raise ValueError(f"chunk {i} has {len(c.token_ids)} tokens but asks for logits at "
                             f"{c.num_logits} of them; ask for 1..{len(c.token_ids)}")
        pos = range(c.start_pos, n)
        tokens += c.token_ids
        positions += pos
        slots += [c.block_table[p // bs] * bs + p % bs for p in pos]
        qsl.append(len(tokens))
        seq_lens.append(n)
        if c.needs_logits:
            logits_idx += range(len(tokens) - c.num_logits, len(tokens))
    tables = torch.tensor([list(c.block_table) + [0] * (width - len(c.block_table)) for c in chunks],
                          dtype=torch.int32).view(len(chunks), width)  # padded with block 0, never attended
    qsl_t, lens_t = torch.tensor(qsl), torch.tensor(seq_lens, dtype=torch.long)
    batch = PagedBatch(qsl_t, lens_t, tables, torch.tensor(slots, dtype=torch.long),
                       torch.tensor(logits_idx, dtype=torch.long), qsl_t, lens_t)
    return (torch.tensor(tokens, dtype=torch.long).to(device), torch.tensor(positions, dtype=torch.long).to(device),
            batch.to(device))


# ---------------------------------------------------------------- planning (once per step)


@dataclass
class _Prefill:
    start: int  # first flat row of the chunk
    end: int
    seq_len: int
    blocks: torch.Tensor  # (ceil(seq_len / bs),) block ids holding the context
    mask: torch.Tensor  # (qlen, seq_len) bool: query i sees keys j <= seq_len - qlen + i
    biases: dict = field(default_factory=dict)  # (dtype, g) -> the mask as SDPA's additive bias

    def bias(self, dtype: torch.dtype, g: int) -> torch.Tensor:
        """(g * qlen, seq_len): made once per step, not converted from bool again in every layer."""
        key = (dtype, g)
        if key not in self.biases:
            self.biases[key] = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill_(
                ~self.mask, float("-inf")).repeat(g, 1)
        return self.biases[key]


@dataclass
class _Plan:
    decode_rows: Optional[torch.Tensor]  # (Sd,) flat rows of the decode tokens
    decode_blocks: Optional[torch.Tensor]  # (Sd, nb) block ids, pads clamped to a valid id
    decode_mask: Optional[torch.Tensor]  # (Sd, 1, 1, nb * bs) bool: key j < seq_len
    prefills: List[_Prefill]
    # Short chunks, Ss of them padded to Q query rows each (a pad row repeats the chunk's last row).
    short_rows: Optional[torch.Tensor] = None  # (Ss, Q) flat rows read
    short_real: Optional[torch.Tensor] = None  # (Ss, Q) bool: a real row (written back)
    short_blocks: Optional[torch.Tensor] = None  # (Ss, nb) block ids, pads clamped to a valid id
    short_mask: Optional[torch.Tensor] = None  # (Ss, 1, Q, nb * bs) bool: causal, offset per sequence


def _plan(batch: PagedBatch, block_size: int, device: torch.device, max_len: int) -> _Plan:
    qsl = (batch.query_start_loc_cpu if batch.query_start_loc_cpu is not None else batch.query_start_loc).tolist()
    seq_lens = (batch.seq_lens_cpu if batch.seq_lens_cpu is not None else batch.seq_lens).tolist()
    if seq_lens and max(seq_lens) > max_len:
        raise ValueError(f"a sequence reaches {max(seq_lens)} tokens, past the model's context (max_seq_len {max_len})")
    qlens = [b - a for a, b in zip(qsl[:-1], qsl[1:])]
    decodes = [i for i, q in enumerate(qlens) if q == 1]
    decode_rows = decode_blocks = decode_mask = None
    if decodes:
        longest = max(seq_lens[i] for i in decodes)
        nb = -(-longest // block_size)
        idx = torch.tensor(decodes, device=device)
        decode_rows = torch.tensor([qsl[i] for i in decodes], device=device)
        decode_blocks = batch.block_tables[idx, :nb].long().clamp(min=0)  # (Sd, nb)
        lens = torch.tensor([seq_lens[i] for i in decodes], device=device)
        decode_mask = (torch.arange(nb * block_size, device=device)[None, :] < lens[:, None])[:, None, None, :]
    shorts = [i for i, q in enumerate(qlens) if 1 < q <= SHORT_CHUNK and seq_lens[i] >= q]
    short = {}
    if shorts:
        Q = max(qlens[i] for i in shorts)
        nb = -(-max(seq_lens[i] for i in shorts) // block_size)
        j = torch.arange(Q)
        ql = torch.tensor([qlens[i] for i in shorts])[:, None]  # (Ss, 1)
        real = j[None, :] < ql  # (Ss, Q)
        rows = torch.tensor([qsl[i] for i in shorts])[:, None] + torch.minimum(j[None, :], ql - 1)
        lens = torch.tensor([seq_lens[i] for i in shorts])[:, None]
        # query row r of a chunk of q sees keys up to seq_len - q + r (a pad row: as the last real row)
        last_key = lens - ql + torch.minimum(j[None, :], ql - 1)  # (Ss, Q)
        mask = torch.arange(nb * block_size)[None, None, :] <= last_key[:, :, None]  # (Ss, Q, nb * bs)
        idx = torch.tensor(shorts, device=device)
        short = dict(short_rows=rows.to(device), short_real=real.to(device),
                     short_blocks=batch.block_tables[idx, :nb].long().clamp(min=0),
                     short_mask=mask[:, None].to(device))
    prefills, short_set = [], set(shorts)
    for i, q in enumerate(qlens):
        if q <= 1 or i in short_set:
            continue  # decodes and short chunks above; an empty chunk attends to nothing
        n = seq_lens[i]
        if n < q:
            raise ValueError(f"sequence {i}: seq_len {n} is shorter than its chunk of {q} tokens")
        blocks = batch.block_tables[i, :-(-n // block_size)].long()
        mask = (torch.arange(n, device=device)[None, :]
                <= torch.arange(n - q, n, device=device)[:, None])  # (q, n), causal with offset n - q
        prefills.append(_Prefill(qsl[i], qsl[i + 1], n, blocks, mask))
    return _Plan(decode_rows, decode_blocks, decode_mask, prefills, **short)


# ---------------------------------------------------------------- attention


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache (num_blocks, bs, nkv, hd), blocks (...) ids -> (..., bs, nkv, hd). index_select, not
    cache[blocks]: advanced indexing costs ~5x more on the CPU (55 vs 10 us at 16 x 9 blocks)."""
    return cache.index_select(0, blocks.reshape(-1)).view(*blocks.shape, *cache.shape[1:])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """One query token per sequence: q (Sd, nh, hd), blocks (Sd, nb), mask (Sd, 1, 1, nb * bs) -> (Sd, nh, hd).

    Shared by the planned step and the fixed-shape one (paged_static.py), so a CUDA graph replays
    exactly the attention the eager path runs."""
    Sd, nh, hd = q.shape
    nkv = k_cache.shape[2]
    qd = q.view(Sd, nkv, nh // nkv, hd)  # a group's g heads take the query-length slot
    kd = gather_blocks(k_cache, blocks).flatten(1, 2).transpose(1, 2).to(q.dtype)  # (Sd, nkv, L, hd)
    vd = gather_blocks(v_cache, blocks).flatten(1, 2).transpose(1, 2).to(q.dtype)
    y = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)  # (Sd, nkv, g, hd)
    return y.reshape(Sd, nh, hd)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """q (T, nh, hd), already rotated; the step's K/V already written -> (T, nh, hd)."""
    T, nh, hd = q.shape
    nkv = k_cache.shape[2]
    g = nh // nkv
    out = torch.empty_like(q)
    if plan.decode_rows is not None:
        out[plan.decode_rows] = decode_attention(q[plan.decode_rows], k_cache, v_cache, plan.decode_blocks,
                                                 plan.decode_mask)
    if plan.short_rows is not None:
        Ss, Q = plan.short_rows.shape
        qs = q[plan.short_rows.flatten()].view(Ss, Q, nkv, g, hd).permute(0, 2, 3, 1, 4).reshape(Ss, nkv, g * Q, hd)
        ks = gather_blocks(k_cache, plan.short_blocks).flatten(1, 2).transpose(1, 2).to(q.dtype)  # (Ss,nkv,L,hd)
        vs = gather_blocks(v_cache, plan.short_blocks).flatten(1, 2).transpose(1, 2).to(q.dtype)
        y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=plan.short_mask.repeat(1, 1, g, 1))
        y = y.view(Ss, nkv, g, Q, hd).permute(0, 3, 1, 2, 4).reshape(Ss, Q, nh, hd)  # (Ss, Q, nh, hd)
        real = plan.short_real
        out[plan.short_rows[real]] = y[real]
    for p in plan.prefills:
        qlen = p.end - p.start
        # 4-d (1, nkv, g*qlen, hd): the CPU's flash kernel takes only 4-d inputs, and a 3-d call
        # falls back to the math path (bmm, where, softmax): 3.5x slower at 256 tokens.
        qp = q[p.start:p.end].view(qlen, nkv, g, hd).permute(1, 2, 0, 3).reshape(1, nkv, g * qlen, hd)
        kp = gather_blocks(k_cache, p.blocks).flatten(0, 1)[:p.seq_len].transpose(0, 1).to(q.dtype)[None]
        vp = gather_blocks(v_cache, p.blocks).flatten(0, 1)[:p.seq_len].transpose(0, 1).to(q.dtype)[None]
        y = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.bias(q.dtype, g))  # (1, nkv, g*qlen, hd)
        out[p.start:p.end] = y.view(nkv, g, qlen, hd).permute(2, 0, 1, 3).reshape(qlen, nh, hd)
    return out


def qkv_to_cache(att, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVPair,
                 slot_mapping: torch.Tensor) -> torch.Tensor:
    """x (T, D) -> rotated q (T, nh, hd); the step's K/V written into the cache at slot_mapping."""
    T = x.shape[0]
    hd = att.head_dim
    # Head counts from the weights, as Attention.forward does (a tensor-parallel shard has fewer).
    wqkv = getattr(att, "serve_wqkv", None)  # wq, wk, wv stacked (serve/engine/layout.py): one product
    if wqkv is not None:
        product = getattr(att, "serve_wqkv_product", None)  # the stack prepacked for the CPU (layout.py)
        qkv = product(x) if product is not None else F.linear(x, wqkv)
        q, k, v = qkv.split([att.wq.out_features, att.wk.out_features, att.wv.out_features], -1)
    else:
        q, k, v = att.wq(x), att.wk(x), att.wv(x)
    q = q.view(T, -1, hd)  # (T, nh, hd)
    k = k.view(T, -1, hd)  # (T, nkv, hd)
    v = v.view(T, -1, hd)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k_cache, v_cache = kv
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    return q


def _attention_step(att, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVPair,
                    slot_mapping: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """The model's Attention module over the flat batch: x (T, D) -> (T, D)."""
    q = qkv_to_cache(att, x, cos, sin, kv, slot_mapping)
    y = paged_attention(q, kv[0], kv[1], plan)  # (T, nh, hd)
    return att.wo(y.reshape(x.shape[0], -1))


# ---------------------------------------------------------------- the forward


def forward_paged(model: Transformer, token_ids: torch.Tensor, positions: torch.Tensor, batch: PagedBatch,
                  kv_caches: List[KVPair]) -> torch.Tensor:
    """token_ids (T,), positions (T,) -> logits (len(logits_indices), vocab).

    kv_caches holds one (K, V) pair per layer of `model`, in the order of model.layers.
    A pipeline stage without embeddings takes hidden states (T, D) as token_ids; one
    without the output head returns the hidden states of all T rows (the next stage
    needs every token), not just logits_indices.
    """
    layers = list(model.layers.values())
    if len(kv_caches) != len(layers):
        raise ValueError(f"{len(kv_caches)} KV cache pairs for {len(layers)} layers; give one (K, V) per layer")
    block_size = kv_caches[0][0].shape[1] if kv_caches else 1
    plan = _plan(batch, block_size, token_ids.device, model.rope_cos.shape[0])
    h = model.tok_embeddings(token_ids) if model.tok_embeddings is not None else token_ids  # (T, D)
    cos = model.rope_cos[positions][:, None, :]  # (T, 1, hd): broadcast over heads
    sin = model.rope_sin[positions][:, None, :]
    for layer, kv in zip(layers, kv_caches):
        h = h + _attention_step(layer.attention, layer.attention_norm(h), cos, sin, kv, batch.slot_mapping, plan)
        h = h + layer.feed_forward(layer.ffn_norm(h)[None]).squeeze(0)  # MoE sees (1, T, D)
    if model.output is None:
        return model.norm(h) if model.norm is not None else h
    h = h[batch.logits_indices]  # the head runs only where logits are wanted
    if model.norm is not None:
        h = model.norm(h)
    return model.output(h)


# ---------------------------------------------------------------- MoE stats


@dataclass
class MoEStepStats:
    """What MoE costs in serving, for the last forward: the seed's "parts may sit dormant"."""

    expert_tokens: torch.Tensor  # (moe layers, E) assignments each expert received
    experts_touched: List[int]  # distinct experts each MoE layer ran


def moe_step_stats(model: Transformer) -> Optional[MoEStepStats]:
    """Read the MoE layers' last_stats (None for a dense model). One host sync."""
    stats = [layer.feed_forward.last_stats for layer in model.layers.values()
             if isinstance(layer.feed_forward, MoE) and layer.feed_forward.last_stats is not None]
    if not stats:
        return None
    tokens = torch.stack([s["tokens_per_expert"] for s in stats])  # (layers, E)
    return MoEStepStats(tokens, (tokens > 0).sum(-1).tolist())


def allocate_kv_caches(model: Transformer, num_blocks: int, block_size: int, dtype: Optional[torch.dtype] = None,
                       device=None) -> List[KVPair]:
    """Zeroed (K, V) per layer, each (num_blocks, block_size, nkv, hd); nkv from the weights."""
    ref = model.rope_cos
    out = []
    for layer in model.layers.values():
        att = layer.attention
        shape = (num_blocks, block_size, att.wk.out_features // att.head_dim, att.head_dim)
        kw = dict(dtype=dtype or next(model.parameters()).dtype, device=device or ref.device)
        out.append((torch.zeros(shape, **kw), torch.zeros(shape, **kw)))
    return out


__all__ = ["SeqChunk", "prepare_step", "PagedBatch", "forward_paged", "paged_attention", "decode_attention",
           "qkv_to_cache", "MoEStepStats", "moe_step_stats", "allocate_kv_caches"]
