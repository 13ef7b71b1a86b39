"""The engine's own settings: a plain dataclass, so the engine imports without pydantic
(the GPU machine has none). `platform/config.py`'s `serve` section carries the same
names; `EngineConfig.from_serve(cfg.serve)` turns one into the other."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # sequences in one engine step
    max_batch_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_step_latency_ms: Optional[float] = None  # shrink batches so a step stays under this
    kv_block_size: int = 16  # tokens per KV-cache block
    kv_cache_blocks: Optional[int] = None  # exactly this many blocks; None = from kv_cache_memory_mb
    kv_cache_memory_mb: float = 512.0  # the KV cache's budget when kv_cache_blocks is None
    enable_prefix_caching: bool = True  # full blocks are shared by every request with the same prefix
    chunked_prefill: bool = True
    dtype: Optional[str] = None  # weights and KV: bfloat16, float16, float32; None = as stored
    device: str = "cpu"
    # Pure-decode steps at bucketed batch sizes, replayed from CUDA graphs (decode_graphs.py):
    # None = where they can be captured (a CUDA device, bf16 experts); "cuda" insists; "static" runs
    # the same fixed-shape steps uncaptured (the CPU's check of that path); "off" never.
    decode_graphs: Optional[str] = None
    decode_graph_sizes: Optional[List[int]] = None  # batch buckets; None = 1, 2, 4, 8, 16, ... max_num_seqs
    max_model_len: Optional[int] = None  # prompt + output limit; None = the model's max_seq_len
    seed: int = 0  # for requests that give no seed of their own
    # Speculative decoding (serve.speculative.*): a drafter proposes up to k tokens per decoding
    # request, the target scores them in one pass, the rejection rule keeps its distribution.
    speculative_method: Optional[str] = None  # None (off), "ngram" (prompt lookup) or "draft" (a small model)
    speculative_tokens: int = 4  # k: drafts per request per step
    speculative_leniency: float = 0.0  # serve.speculative.acceptance: 0 = the exact rule; > 0 accepts more
    draft_model: Optional[str] = None  # "draft": a path load_for_serving takes, same vocabulary as the target
    ngram_min_n: int = 2  # "ngram": the shortest suffix looked up in the sequence so far
    ngram_max_n: int = 4  # and the longest (tried first)
    # Model parallelism across Ray stage actors (moray/actors/serve_gang.py): pipeline stages,
    # tensor-parallel ranks per stage, expert shards per stage. All 1 = the model runs in process.
    pp: int = 1
    tp: int = 1
    ep: int = 1
    cpus_per_actor: float = 1.0  # each stage actor's CPUs (its torch threads)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_batch_tokens", "kv_block_size", "pp", "tp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve.{name} must be >= 1 (got {getattr(self, name)})")
        if self.kv_cache_blocks is not None and self.kv_cache_blocks < 2:
            raise ValueError(f"serve.kv_cache_blocks must be >= 2 (got {self.kv_cache_blocks})")
        if self.max_step_latency_ms is not None and self.max_step_latency_ms <= 0:
            raise ValueError(f"serve.max_step_latency_ms must be > 0 (got {self.max_step_latency_ms})")
        if self.decode_graphs not in (None, "cuda", "static", "off"):
            raise ValueError(f"serve.decode_graphs {self.decode_graphs!r}: use None (auto), 'cuda', 'static' or 'off'")
        if self.decode_graph_sizes is not None and (not self.decode_graph_sizes or min(self.decode_graph_sizes) < 1):
            raise ValueError(f"serve.decode_graph_sizes {self.decode_graph_sizes!r}: give positive batch sizes")
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"serve.dtype {self.dtype!r}: use bfloat16, float16 or float32")
        if self.speculative_method is None and self.draft_model is not None:
            self.speculative_method = "draft"  # a draft model given means drafting with it
        if self.speculative_method not in (None, "ngram", "draft"):
            raise ValueError(f"serve.speculative_method {self.speculative_method!r}: use None (off), 'ngram' "
                             "or 'draft' (with serve.draft_model)")
        if self.speculative_tokens < 1:
            raise ValueError(f"serve.speculative_tokens must be >= 1 (got {self.speculative_tokens})")
        if self.speculative_leniency < 0:
            raise ValueError(f"serve.speculative_leniency must be >= 0 (got {self.speculative_leniency}); "
                             "0 is the exact rule")
        if not 1 <= self.ngram_min_n <= self.ngram_max_n:
            raise ValueError(f"serve.ngram_min_n ({self.ngram_min_n}) and ngram_max_n ({self.ngram_max_n}) need "
                             "1 <= min <= max")

    @property
    def gang_size(self) -> int:
        """Stage actors this engine runs on (1: in process, no Ray)."""
        return self.pp * self.tp * self.ep

    @classmethod
    def from_serve(cls, serve: Any, **extra) -> "EngineConfig":
        """From the config's `serve` section (any object with these attribute names): the KV cache
        and weights in serve.dtype, as `moray plan` counts them."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{n: getattr(serve, n) for n in names if hasattr(serve, n)}, **extra})

    @classmethod
    def from_overrides(cls, overrides: Dict[str, Any]) -> "EngineConfig":
        """Keyword arguments as LLM(path, **overrides) takes them; an unknown one is named."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown engine setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**overrides)
