"""A decode step at fixed shapes: what a CUDA graph captures.

`forward_paged` plans each step on the host (which rows decode, the exact context, a Python
loop over prefill chunks): right for mixed steps, but a CUDA graph replays fixed kernels on
fixed buffers, so nothing may depend on host values. A pure decode step (every sequence one
token: most steps of a busy server) varies only in B, the sequences, and the context; padding
B to a bucket and the block table to a bucket width gives a few fixed shapes, each captured
once and replayed (vLLM's cudagraph capture sizes). At batch 1 a decode is launch-bound on a
GPU (hundreds of small kernels for a few microseconds of work each): the replay is one launch.

Pad rows: token 0 at position 0, every block-table entry the scratch block, seq_len 1: they
write K/V into the scratch slot, attend to it alone (no all-masked row, so no NaN), and their
logits are dropped. Routing is per token and the layer is dropless, so real rows do not see
them. Attention is paged.decode_attention, the very function the planned step runs.

Legend: B = sequences (padded), nb = block-table width, bs = block size, V = vocabulary.
"""

from __future__ import annotations

from typing import List

import torch

from moray.model.paged import KVPair, decode_attention, qkv_to_cache
from moray.model.transformer import Transformer


def forward_decode_static(model: Transformer, token_ids: torch.Tensor, positions: torch.Tensor,
                          slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                          kv_caches: List[KVPair]) -> torch.Tensor:
    """token_ids, positions, slot_mapping, seq_lens (B,); block_tables (B, nb) -> logits (B, V).

    No host reads and no data-dependent shapes: the same kernels for any values of the inputs."""
    block_size = kv_caches[0][0].shape[1]
    nb = block_tables.shape[1]
    blocks = block_tables.long()
    mask = (torch.arange(nb * block_size, device=token_ids.device)[None, :] < seq_lens[:, None])[:, None, None, :]
    h = model.tok_embeddings(token_ids)  # (B, D)
    cos = model.rope_cos[positions][:, None, :]  # (B, 1, hd)
    sin = model.rope_sin[positions][:, None, :]
    for layer, kv in zip(model.layers.values(), kv_caches):
        att = layer.attention
        x = layer.attention_norm(h)
        q = qkv_to_cache(att, x, cos, sin, kv, slot_mapping)  # (B, nh, hd)
        y = decode_attention(q, kv[0], kv[1], blocks, mask)  # (B, nh, hd)
        h = h + att.wo(y.reshape(h.shape[0], -1))
        h = h + layer.feed_forward(layer.ffn_norm(h)[None]).squeeze(0)  # MoE sees (1, B, D)
    return model.output(model.norm(h))


__all__ = ["forward_decode_static"]
