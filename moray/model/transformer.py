"""The decoder-only MoE transformer: embedding -> blocks -> norm -> output.

One `forward(tokens, input_pos)` serves training (input_pos None: causal over
the whole sequence) and inference (input_pos given: prefill then decode against
the KV cache). Pipeline stages are this same module with parts set to None
and layers removed (layers is a ModuleDict keyed by global index, so parameter
names stay the same under every layout and checkpoints move between layouts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple, Union

import torch
from torch import nn

from moray.model.config import ModelConfig
from moray.model.init import init_parameters
from moray.model.layers import Attention, KVCache, RMSNorm, rope_tables
from moray.model.moe import MLP, MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = MoE(cfg) if cfg.is_moe else MLP(cfg.d_model, cfg.ffn_hidden, cfg.mlp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass
class MoEAux:
    """Router statistics of the last forward, means over MoE layers (for logging:
    their gradients are already applied inside each layer)."""

    load_balancing_loss: torch.Tensor  # 1.0 = perfectly balanced
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor  # (layers, E) assignments per expert, before capacity drops
    dropped: torch.Tensor  # assignments dropped by capacity, all layers


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: Optional[Iterable[int]] = None):
        """layers: build only these blocks (a pipeline stage, without constructing the other
        stages' blocks first), keyed by global index as in the whole model; None: all of them."""
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.d_model)
        held = range(cfg.n_layers) if layers is None else layers
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in held})
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output: Optional[nn.Linear] = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd)
        self.register_buffer("rope_sin", sin, persistent=False)

    def tie_weights(self) -> None:
        """Share the embedding with the output projection (tie_embeddings). `to_empty()` from the
        meta device materialises each parameter separately, which unties them: call again after."""
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    # ------------------------------------------------------------ forward

    def forward(self, tokens: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                return_aux: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, Optional[MoEAux]]]:
        """tokens (B, T) int -> logits (B, T, vocab).

        A stage without embeddings takes hidden states (B, T, D) instead, and one
        without the output head returns hidden states.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if input_pos is None:  # the whole tables: attention takes positions 0..T-1 of the sequence it sees
            cos, sin = self.rope_cos, self.rope_sin
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        for layer in self.layers.values():
            h = layer(h, cos, sin, input_pos)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        return (h, self.moe_aux()) if return_aux else h

    def moe_aux(self) -> Optional[MoEAux]:
        stats = [m.last_stats for m in self.modules() if isinstance(m, MoE) and m.last_stats is not None]
        if not stats:
            return None
        def mean_of(key: str) -> torch.Tensor:  # None under inference mode: not computed there
            vals = [s[key] for s in stats]
            return torch.stack(vals).mean() if all(v is not None for v in vals) else torch.tensor(float("nan"))

        return MoEAux(
            load_balancing_loss=mean_of("load_balancing_loss"),
            z_loss=mean_of("z_loss"),
            tokens_per_expert=torch.stack([s["tokens_per_expert"] for s in stats]),
            dropped=torch.stack([s["dropped"] for s in stats]).sum(),
        )

    # ------------------------------------------------------------ inference

    def setup_kv_cache(self, batch_size: int, max_seq_len: Optional[int] = None,
                       dtype: Optional[torch.dtype] = None) -> None:
        ref = next(self.parameters())
        length = max_seq_len or self.cfg.max_seq_len
        for layer in self.layers.values():
            att = layer.attention
            att.kv_cache = KVCache(batch_size, length, att.wk.out_features // att.head_dim, att.head_dim,
                                   dtype=dtype or ref.dtype, device=ref.device)

    def clear_kv_cache(self) -> None:
        for layer in self.layers.values():
            layer.attention.kv_cache = None

    # ------------------------------------------------------------ weights

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init keyed by parameter name (and global expert id): see moray/model/init.py.

        Any part of the model (a pipeline stage, an expert shard) built and
        initialised on its own gets exactly the values the whole model would.
        Works after `to_empty()` from the meta device.
        """
        self.init_buffers()
        init_parameters(self, seed, self.cfg.init_std)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The rotary tables (not parameters: derived from the config, never saved), in the dtype
        and on the device the buffers already have."""
        cos, sin = rope_tables(self.cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)


def build_model(cfg: ModelConfig, seed: int = 0, device: Union[str, torch.device] = "cpu",
                dtype: torch.dtype = torch.float32) -> Transformer:
    """Build on the meta device, materialise on `device`, then initialise."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model.to(dtype)
