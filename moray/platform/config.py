"""The whole config: six sections assembled and validated with pydantic v2.

Each room owns the type of its section (`moray.model.ModelConfig`,
`moray.parallel.ParallelConfig`, `moray.data.DataConfig` are plain dataclasses
so those rooms import without pydantic); the sections only the control plane
reads (`train`, `serve`, `cluster`) are pydantic models here. Every error names
the key's full path and, for unknown keys, the keys that are allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moray.data.config import DataConfig
from moray.model.config import ModelConfig
from moray.parallel.config import ParallelConfig


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ChaosConfig(_Section):
    """Fault injection for tests and drills. Nothing happens unless a field is set."""

    kill_worker_at_step: Optional[int] = None  # the rank below exits hard before this step
    kill_rank: int = 0
    hang_at_step: Optional[int] = None  # the rank below sleeps inside this step (watchdog test)
    hang_rank: int = 0
    raise_at_step: Optional[int] = None  # the rank below raises before this step (with once=false: a bug that repeats)
    raise_rank: int = 0
    crash_during_checkpoint_at_step: Optional[int] = None  # die after shards, before commit
    nan_at_step: Optional[int] = None  # make this step's loss NaN (train.on_nan test)
    once: bool = True  # fire only in the first attempt, so the restarted run goes on


class TrainConfig(_Section):
    # Bounds live on the fields so a value that could only fail inside a worker (a modulo by
    # checkpoint_every = 0, a watchdog that fires at once) is refused in the driver, by key.
    run_name: str = Field("run", min_length=1)  # the run lives in <runs_dir>/<run_name>/
    runs_dir: str = "runs"  # a path every node can read (NFS, a shared disk): not a URI; see _runs_dir_is_a_path
    storage: Optional[str] = None  # checkpoints: local path or pyarrow.fs URI; None = <run>/checkpoints
    # Fine-tuning: a fresh run starts from these weights (HF Mixtral dir, moray dir, or a moray run /
    # checkpoint) instead of random init; a resumed run ignores it. See platform/init_weights.py.
    init_from: Optional[str] = None
    max_steps: int = Field(100, ge=1)
    seq_len: int = Field(128, ge=1)
    micro_batch_size: int = Field(4, ge=1)  # sequences per microbatch per dp rank
    batch_tokens: Optional[int] = Field(None, ge=1)  # global tokens per step after the ramp; None = one microbatch round
    batch_tokens_start: Optional[int] = Field(None, ge=1)  # global tokens per step at step 0 (ramp start)
    batch_ramp_tokens: int = Field(0, ge=0)  # tokens over which the batch grows linearly to batch_tokens
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(10, ge=0)
    lr_decay_steps: Optional[int] = Field(None, ge=1)  # cosine to min_lr over this many steps; None = max_steps
    weight_decay: float = Field(0.1, ge=0)
    betas: List[float] = Field(default_factory=lambda: [0.9, 0.95])  # AdamW's (beta1, beta2), each in [0, 1)
    eps: float = Field(1e-8, gt=0)  # AdamW's epsilon
    grad_clip: float = Field(1.0, ge=0)  # global-norm clipping; 0 = off
    seed: int = 1234
    dtype: Literal["float32", "bfloat16"] = "float32"  # bf16: bf16 weights and activations, fp32 master + Adam
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    async_checkpoint: bool = True
    log_every: int = Field(1, ge=1)
    # The watchdog ends a worker whose step stalls (a hung collective never raises). Start-up
    # (building the model, loading a checkpoint, the first step's warm-up) and checkpoint waits
    # are bounded separately: a slow save must not kill healthy workers in a loop.
    hang_timeout_s: float = Field(300.0, gt=0)
    startup_timeout_s: float = Field(1800.0, gt=0)
    checkpoint_timeout_s: float = Field(1800.0, gt=0)
    max_failures: int = Field(3, ge=-1)  # restarts Ray Train may make; -1 = no limit
    on_nan: Literal["skip", "halt", "restart"] = "skip"
    loggers: List[str] = Field(default_factory=list)  # also write metrics.jsonl's fields to: tensorboard, mlflow
    chaos: ChaosConfig = Field(default_factory=ChaosConfig)

    @field_validator("betas")
    @classmethod
    def _two_betas(cls, v: List[float]) -> List[float]:
        if len(v) != 2 or not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"need two values, each in [0, 1), e.g. [0.9, 0.95] (got {v})")
        return v

    @field_validator("runs_dir")
    @classmethod
    def _runs_dir_is_a_path(cls, v: str) -> str:
        # Ranks append metrics and events to the run directory line by line, which object
        # stores cannot do; checkpoints, the only large output, may live on one (train.storage).
        if "://" in v and not v.startswith("file://"):
            raise ValueError(f"{v!r} is a URI; the run directory (config, metrics, events) must be a path every "
                             f"node can see (a shared disk); put checkpoints on object storage with train.storage")
        return v[len("file://"):] if v.startswith("file://") else v


class ServeConfig(_Section):
    # The engine's keys carry moray.serve.engine.EngineConfig's names (EngineConfig.from_serve).
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model_name: str = "moray"
    max_num_seqs: int = Field(64, ge=1)  # sequences in one engine step
    max_batch_tokens: int = Field(2048, ge=1)  # token budget of one engine step (prefill chunks + decodes)
    max_step_latency_ms: Optional[float] = Field(None, gt=0)  # shrink batches to keep a step under this
    kv_block_size: int = Field(16, ge=1)  # tokens per KV-cache block
    kv_cache_blocks: Optional[int] = Field(None, ge=2)  # None = size from kv_cache_memory_mb
    kv_cache_memory_mb: float = Field(512.0, gt=0)
    enable_prefix_caching: bool = True
    chunked_prefill: bool = True
    max_model_len: Optional[int] = Field(None, ge=1)  # prompt + output; None = model.max_seq_len
    max_tokens_default: int = Field(128, ge=1)
    speculative_method: Optional[Literal["ngram", "draft"]] = None  # speculative decoding; None = off
    speculative_tokens: int = Field(4, ge=1)  # drafts per request per step
    speculative_leniency: float = Field(0.0, ge=0)  # the acceptance knob above the exact rule (biases output)
    draft_model: Optional[str] = None  # "draft": a smaller model with the same tokenizer (any path LLM takes)
    ngram_min_n: int = Field(2, ge=1)
    ngram_max_n: int = Field(4, ge=1)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # the serving engine's weights and KV dtype
    # Pure-decode steps replayed from CUDA graphs at bucketed batch sizes: None = where capturable
    # (CUDA, bf16 experts); "static" = the same fixed shapes uncaptured (the CPU check); "off".
    decode_graphs: Optional[Literal["cuda", "static", "off"]] = None
    decode_graph_sizes: Optional[List[int]] = None  # batch buckets; None = 1, 2, 4, 8, 16, ... max_num_seqs
    # Model parallelism over Ray stage actors: pipeline stages x tensor ranks x expert shards (1 = in process).
    pp: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    # The planner's routing model: each MoE layer's share of routed assignments per expert, one row
    # for every layer or one per layer, as bench/serve_experts.py measures them; None = uniform.
    expert_shares: Optional[List[List[float]]] = None
    # The HTTP endpoint (moray/serve/openai, moray/serve/app.py): keys, limits, overload, replicas.
    api_keys_file: Optional[str] = None  # one API key per line (# comments); MORAY_API_KEYS (comma-separated) adds more
    max_request_bytes: int = Field(1 << 20, ge=1)  # a larger request body is refused (413) before it is parsed
    max_n: int = Field(16, ge=1)  # choices one request may ask for (n x prompts)
    max_tokens_limit: Optional[int] = Field(None, ge=1)  # the largest max_tokens accepted; None = the context
    max_queue: int = Field(64, ge=0)  # sequences a replica queues beyond max_num_seqs; past that, 429
    retry_after_s: float = Field(1.0, ge=0)  # the 429's Retry-After header
    num_replicas: int = Field(1, ge=1)  # LLM server replicas; a Serve config's autoscaling_config replaces it
    replica_cpus: float = Field(1.0, ge=0)  # CPUs Ray reserves for each LLM server replica


class ClusterConfig(_Section):
    address: Optional[str] = None  # Ray address; None = RAY_ADDRESS or an embedded local cluster
    num_workers: Optional[int] = None  # training workers; None = tp * pp * dp (dp from parallel or 1)
    use_gpu: bool = False
    gpu: str = "cpu"  # accelerator name in the planner's catalogue (peak FLOP/s for MFU)
    gpus_per_node: int = 8
    cpus_per_worker: float = 1.0
    price_per_gpu_hour: Optional[float] = None
    peak_flops: Optional[float] = None  # override the catalogue's dense peak per device


class MorayConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "MorayConfig":
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
                f"({self.model.max_seq_len}); raise model.max_seq_len or lower train.seq_len"
            )
        p = self.parallel
        if p.sequence_parallel and p.tp > 1 and self.train.seq_len % p.tp:
            raise ValueError(
                f"parallel.sequence_parallel splits each sequence over tp = {p.tp} ranks, but train.seq_len "
                f"({self.train.seq_len}) is not a multiple of {p.tp}; use a multiple or sequence_parallel=false"
            )
        return self

    def world_size(self) -> int:
        p = self.parallel
        if self.cluster.num_workers is not None:
            return self.cluster.num_workers
        return p.tp * p.pp * (p.dp or 1)

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = tuple(MorayConfig.model_fields)


def _field_types(tp: Any) -> Dict[str, Any]:
    """Field name -> type of a section (pydantic model or dataclass); {} for anything else."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {k: f.annotation for k, f in tp.model_fields.items()}
    if dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp)  # resolves `from __future__ import annotations` strings
    return {}


def _inner(tp: Any) -> Any:
    """Optional[X] / List[X] -> X (a Literal stays as it is)."""
    if typing.get_origin(tp) in (typing.Union, list, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _inner(args[0])
    return tp


def _allowed_keys(loc: tuple, root: Any = MorayConfig) -> List[str]:
    """The keys allowed at a path like ('model',) or ('data', 'sources', 0)."""
    tp: Any = root
    for part in loc:
        if not isinstance(part, int):
            tp = _inner(_field_types(tp).get(part))
    return sorted(_field_types(tp))


def _format_error(err: ValidationError, root: Any = MorayConfig) -> str:
    """One line per problem, each naming its key; `root` is the validated model (another file's
    schema, e.g. the router's regions.yaml, reuses this)."""
    lines = []
    for e in err.errors():
        # pydantic adds steps that are no keys: validator names ("function-...") and, for
        # dataclass sections, the class name (keys are snake_case, class names are not).
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p[:1].isupper())))
        path = ".".join(str(p) for p in loc) or "<config>"
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            allowed = _allowed_keys(loc[:-1], root)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"{path}: unknown key"
            if hint:
                msg += f" (did you mean {'.'.join(str(p) for p in loc[:-1] + (hint[0],))}?)"
            if allowed:
                msg += f"; allowed keys: {', '.join(allowed)}"
        else:
            msg = f"{path}: {e['msg'].removeprefix('Value error, ')}"
            if "input" in e and not isinstance(e["input"], (dict, list)):
                msg += f" (got {e['input']!r})"
        lines.append(msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_override(item: str) -> tuple[List[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-3")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or path[0] not in SECTIONS:
        raise ConfigError(
            f"--set {item!r}: the key must start with a section ({', '.join(SECTIONS)}), e.g. model.n_layers=4"
        )
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    for item in overrides or []:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def build_config(raw: Dict[str, Any]) -> MorayConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections ({', '.join(SECTIONS)})")
    try:
        return MorayConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    except (TypeError, ValueError) as err:  # raised by a dataclass __post_init__
        raise ConfigError(f"invalid config: {err}") from None


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> MorayConfig:
    raw: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} not found; presets live in configs/ (e.g. configs/tiny.yaml)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return build_config(apply_overrides(raw, overrides or []))
