"""Serving: weights and KV cache per GPU, the largest batch, decode speed and cost.

A serving replica is tp x pp GPUs: each holds 1/tp of its stage's layers (all
experts of those layers; K/V whole per KV head, so one MQA head is replicated)
and the KV cache of every running sequence for those layers. A batch of B
sequences is split into min(B, pp) micro-batches so every stage has work; one
decode round (every sequence gains a token) takes pp stage-slots. A slot is
bounded below by memory (read the stage's weights that the micro-batch
touches, plus its KV cache) and by compute (2 x active parameters + attention
over the context, per token); the slot costs the larger of the two. For an MoE,
b tokens choosing top_k of E experts touch E (1 - (1 - k/E)^b) experts per
layer on average (uniform routing), so small batches read fewer expert weights.
A trained router is not uniform: given the share p_e of routed assignments each
expert receives (`serve.expert_shares`, measured by the engine), independent
tokens touch sum_e (1 - (1 - k p_e)^b), fewer at mid batch sizes
(bench/serve_experts.py measures both against the engine).

Decode only: prompt tokens (prefill) are compute-bound, 2 x active FLOPs each,
and cost extra. Not modelled: TP all-reduce latency, speculative decoding,
quantised weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple, Union

from moray.model.config import ModelConfig
from moray.model.params import attention_params_per_layer, expert_params
from moray.platform.planner.catalogue import Accelerator
from moray.platform.planner.errors import PlanError
from moray.platform.planner.layouts import divisors
from moray.platform.planner.activations import kv_heads_per_rank
from moray.platform.planner.memory import pipeline_ranks, rank_params


# serve.dtype -> bytes per weight and per KV value: the serving engine's own dtype, whatever
# the training ran in (a float32 CPU run still serves in bfloat16 by default).
SERVE_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class ServeSetup:
    model: ModelConfig
    accelerator: Accelerator
    tp: int
    pp: int
    context: int  # tokens in each sequence's KV cache (prompt + generated)
    price_per_gpu_hour: Optional[float]
    weight_bytes: int = 2
    kv_bytes: int = 2
    usable_fraction: float = 0.9
    gpus_per_node: int = 8
    expert_shares: Optional[Tuple[Tuple[float, ...], ...]] = None  # per MoE layer; None = uniform routing

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """2 (K and V) x layers x KV heads x head_dim x bytes, for the whole model."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


Shares = Union[Sequence[float], Sequence[Sequence[float]]]


def expert_shares(cfg: ModelConfig, shares: Shares) -> Tuple[Tuple[float, ...], ...]:
    """Per-layer shares of routed assignments, each layer summing to 1, from one vector for
    every layer or one per MoE layer (counts work too: each layer is normalised)."""
    layers = [shares] if shares and not isinstance(shares[0], (list, tuple)) else list(shares)
    if not cfg.is_moe or not layers or len(layers) not in (1, cfg.n_layers):
        raise PlanError(f"serve.expert_shares: give one vector of {cfg.n_experts} shares for every layer or "
                        f"one per layer ({cfg.n_layers}); got {len(layers)} for a model with "
                        f"{cfg.n_experts} experts")
    out = []
    for i, layer in enumerate(layers):
        total = float(sum(layer))
        if len(layer) != cfg.n_experts or min(layer) < 0 or total <= 0:
            raise PlanError(f"serve.expert_shares[{i}]: need {cfg.n_experts} non-negative shares with a positive "
                            f"sum (got {len(layer)}, sum {total:g}); measure them with bench/serve_experts.py")
        row = tuple(float(p) / total for p in layer)
        if max(row) > 1 / cfg.top_k + 1e-6:
            raise PlanError(f"serve.expert_shares[{i}]: an expert's share is {max(row):.3f}, but with top_k "
                            f"{cfg.top_k} a token sends it at most one of its {cfg.top_k} assignments, so no "
                            f"share exceeds 1/{cfg.top_k}; give shares of assignments, not of probability mass")
        out.append(row)
    return tuple(out)


def experts_touched(cfg: ModelConfig, tokens: float, shares: Optional[Shares] = None) -> float:
    """Expected distinct experts per layer that `tokens` independent tokens route to.

    Uniform routing (shares None): E (1 - (1 - k/E)^b), exact in expectation for top-k.
    Measured shares p_e (per layer, or one for all): an expert is missed by one token with
    probability 1 - k p_e, so sum_e (1 - (1 - k p_e)^b), averaged over layers; uniform p_e = 1/E
    gives the formula above."""
    if not cfg.is_moe:
        return 1.0
    if shares is None:
        return cfg.n_experts * (1 - (1 - cfg.top_k / cfg.n_experts) ** tokens)
    layers = expert_shares(cfg, shares)
    k = cfg.top_k
    return sum(sum(1 - (1 - min(1.0, k * p)) ** tokens for p in layer) for layer in layers) / len(layers)


@dataclass(frozen=True)
class DecodePoint:
    batch: int
    micro_batches: int
    experts_touched_per_layer: float
    memory_bound_s: float  # one decode round if only memory traffic counted
    compute_bound_s: float  # one decode round if only FLOPs counted
    round_s: float  # every sequence gains one token
    bound: str
    tokens_per_s: float
    cost_usd_per_1k_tokens: Optional[float]

    def to_dict(self) -> dict:
        return asdict(self)


class ServePlan:
    def __init__(self, s: ServeSetup, suggest: bool = True):
        cfg, self.s = s.model, s
        if s.tp > 1 and (cfg.n_heads % s.tp or cfg.ffn_hidden % s.tp):
            raise PlanError(f"serving tp {s.tp} must divide n_heads {cfg.n_heads} and ffn_hidden {cfg.ffn_hidden}")
        self.ranks = pipeline_ranks(cfg, s.pp)
        self.kv_heads = kv_heads_per_rank(cfg.n_kv_heads, s.tp)
        self.stage_params = [rank_params(cfg, s.tp, 1, r, s.pp).total for r in self.ranks]  # per GPU
        self.params_per_gpu = max(self.stage_params)
        self.weights_bytes_per_gpu = self.params_per_gpu * s.weight_bytes
        self.usable_bytes = s.accelerator.memory_bytes * s.usable_fraction
        self.free_bytes_per_gpu = self.usable_bytes - self.weights_bytes_per_gpu
        self.kv_bytes_per_token_per_gpu = 2 * max(r.layers for r in self.ranks) * self.kv_heads * cfg.head_dim * s.kv_bytes
        if self.free_bytes_per_gpu <= 0:
            raise PlanError(
                f"serving on tp {s.tp} x pp {s.pp} {s.accelerator.name}: the weights alone need "
                f"{self.weights_bytes_per_gpu / 2**30:.1f} GiB per GPU > {self.usable_bytes / 2**30:.1f} GiB usable"
                + (f"; what would fit: {describe_default(cfg, s)}" if suggest else ""))
        self.kv_capacity_tokens = int(self.free_bytes_per_gpu // self.kv_bytes_per_token_per_gpu)

    def max_batch(self, context: Optional[int] = None) -> int:
        return self.kv_capacity_tokens // (context or self.s.context)

    def _slot(self, stage: int, b: int, c: int) -> tuple[float, float, float]:
        """(memory seconds, compute seconds, experts touched) of one stage-slot for b sequences."""
        s, cfg, acc = self.s, self.s.model, self.s.accelerator
        rank = self.ranks[stage]
        layers = rank.layers
        touched = experts_touched(cfg, b, s.expert_shares)
        kv_proj = 2 * cfg.d_model * cfg.n_kv_heads * cfg.head_dim
        dense_layer = attention_params_per_layer(cfg) + (cfg.d_model * cfg.n_experts if cfg.is_moe else 0)
        kv_gpu = kv_proj / s.tp if cfg.n_kv_heads % s.tp == 0 else kv_proj
        dense_gpu = (dense_layer - kv_proj) / s.tp + kv_gpu
        head = cfg.vocab_size * cfg.d_model if rank.last else 0.0  # whole on every tensor rank
        weights_read = (layers * (dense_gpu + touched * expert_params(cfg) / s.tp) + head) * s.weight_bytes
        kv_read = b * c * 2 * layers * self.kv_heads * cfg.head_dim * s.kv_bytes
        matmul = dense_layer + cfg.active_experts * expert_params(cfg)
        flops = b * (layers * (2 * matmul + 4 * cfg.n_heads * cfg.head_dim * c) / s.tp + 2 * head)
        return (weights_read + kv_read) / acc.memory_bandwidth, flops / (acc.peak_flops * acc.matmul_efficiency), touched

    def decode(self, batch: int, context: Optional[int] = None) -> DecodePoint:
        s = self.s
        c = context or s.context
        n_mb = max(1, min(batch, s.pp))
        b = -(-batch // n_mb)  # sequences per micro-batch
        slots = [self._slot(st, b, c) for st in sorted({0, s.pp - 1})]
        memory_s, compute_s, touched = max(slots, key=lambda x: max(x[0], x[1]))
        round_s = s.pp * max(memory_s, compute_s)
        tokens_per_s = batch / round_s
        cost = None
        if s.price_per_gpu_hour is not None:
            cost = s.gpus * s.price_per_gpu_hour / 3600 / tokens_per_s * 1000
        return DecodePoint(batch, n_mb, touched, s.pp * memory_s, s.pp * compute_s, round_s,
                           "memory" if memory_s >= compute_s else "compute", tokens_per_s, cost)

    def batch_ladder(self) -> List[int]:
        top = self.max_batch()
        sizes, b = [1], max(2, self.s.pp)
        while b < top:
            sizes.append(b)
            b *= 4
        return sorted(set(x for x in sizes + [top] if 1 <= x <= max(1, top)))

    def context_for_cost(self, target_usd_per_1k: float) -> Optional[int]:
        """The longest context at which a full batch decodes at or under the target cost, or None."""
        def ok(c: int) -> bool:
            batch = self.max_batch(c)
            return batch >= 1 and self.decode(batch, c).cost_usd_per_1k_tokens <= target_usd_per_1k
        lo, hi = 1, self.s.model.max_seq_len
        if not ok(lo):
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
        return lo


def serve_stages(cfg: ModelConfig, tp: int = 1, pp: int = 1, ep: int = 1, weight_bytes: int = 2,
                 kv_bytes: int = 2) -> List[dict]:
    """Per pipeline stage of a serving gang (pp x ep x tp ranks): its layers and, per rank, the
    weights and KV cache bytes per token it holds. ep splits each stage's experts; attention and
    its KV cache are replicated over ep (moray/parallel/serving_build.py runs them so), so ep
    changes the weights only. The gang's StageRunners hold exactly this (tests/test_serve_stages_dist.py)."""
    if cfg.is_moe and cfg.n_experts % ep or not cfg.is_moe and ep != 1:
        raise PlanError(f"serving ep {ep} must divide n_experts {cfg.n_experts} (ep 1 for a dense model)")
    kv_heads = kv_heads_per_rank(cfg.n_kv_heads, tp)
    out = []
    for stage, rank in enumerate(pipeline_ranks(cfg, pp)):
        params = rank_params(cfg, tp, ep, rank, pp).total
        out.append({"stage": stage, "layers": rank.layers, "params_per_gpu": params,
                    "weights_bytes_per_gpu": params * weight_bytes,
                    "kv_cache_bytes_per_token_per_gpu": 2 * rank.layers * kv_heads * cfg.head_dim * kv_bytes})
    return out


def default_serving_layout(cfg: ModelConfig, accelerator: Accelerator, gpus_per_node: int, context: int,
                           weight_bytes: int = 2, usable_fraction: float = 0.9) -> tuple[int, int]:
    """The fewest GPUs (TP within a node first, then PP in powers of two) whose free memory
    holds at least 8 sequences of `context` tokens per pipeline stage."""
    tps = [t for t in divisors(gpus_per_node) if cfg.n_heads % t == 0 and cfg.ffn_hidden % t == 0
           and (cfg.n_kv_heads % t == 0 or t % cfg.n_kv_heads == 0)]
    pp = 1
    while pp <= cfg.n_layers:
        for tp in tps:
            setup = ServeSetup(cfg, accelerator, tp, pp, context, None, weight_bytes, weight_bytes, usable_fraction,
                               gpus_per_node)
            try:
                if ServePlan(setup, suggest=False).max_batch() >= 8 * pp:
                    return tp, pp
            except PlanError:
                continue
        pp *= 2
    raise PlanError(f"the model does not fit any tp <= {gpus_per_node} x pp <= {cfg.n_layers} layout of "
                    f"{accelerator.name} with room for its KV cache at {context:,} tokens")


def describe_default(cfg: ModelConfig, s: ServeSetup) -> str:
    try:
        tp, pp = default_serving_layout(cfg, s.accelerator, s.gpus_per_node, s.context, s.weight_bytes,
                                        s.usable_fraction)
    except PlanError as err:
        return str(err)
    return f"tp {tp} x pp {pp} ({tp * pp} GPUs)"
