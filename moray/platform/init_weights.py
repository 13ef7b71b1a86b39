"""`train.init_from`: start a run from existing weights (fine-tuning) instead of random init.

    source = check_init_from(cfg.train.init_from, cfg.model)    # the driver, before any worker starts
    summary = load_initial_weights(engine, source.path)         # every rank, once, only when starting fresh

The source may be a Hugging Face Mixtral directory, a moray directory (`moray convert`),
or a moray training checkpoint (a run dir, checkpoint root or step dir, any layout,
local or a pyarrow URI). Only weights are loaded; the optimizer, the step count and
the data position start fresh. A resumed run ignores init_from: its own checkpoint wins.

Which config fields must agree: those that decide tensor shapes or what the weights
mean (MUST_MATCH). The rest may differ on purpose (context extension changes
max_seq_len and the rotary settings; a fine-tune may route or regularise differently;
HF sources carry Mixtral's own router-loss settings) and are reported, not refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from moray.model.config import ModelConfig
from moray.platform.weights import DcpWeights, WeightSource, WeightsError, open_weights

MUST_MATCH = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "mlp",
              "n_experts", "tie_embeddings", "norm_eps")


class InitFromError(WeightsError):
    """train.init_from names something that cannot initialise this run."""


@dataclass
class InitSource:
    """What check_init_from found: hand `path` to the workers (a checkpoint pinned to its step)."""

    path: str
    kind: str  # "hf", "moray" or "checkpoint"
    step: Optional[int]
    notes: List[str] = field(default_factory=list)  # fields that differ but may, and other remarks


@dataclass
class InitSummary(InitSource):
    tensors: int = 0  # whole tensors read on this rank (bf16 engines read each twice: weight, master)
    bytes: int = 0
    seconds: float = 0.0

    def to_event(self) -> Dict:
        return asdict(self)


def config_differences(source: ModelConfig, run: ModelConfig) -> tuple[List[str], List[str]]:
    """(refused, allowed): 'field: source X, run Y' for every field that differs."""
    refused, allowed = [], []
    for name in ModelConfig.__dataclass_fields__:
        a, b = getattr(source, name), getattr(run, name)
        if a != b:
            (refused if name in MUST_MATCH else allowed).append(f"model.{name}: source {a!r}, run {b!r}")
    return refused, allowed


def _open_checked(path: str, model_cfg: ModelConfig) -> tuple[WeightSource, List[str]]:
    try:
        src = open_weights(path, model_cfg=model_cfg, master=True)
    except WeightsError as e:
        raise InitFromError(f"train.init_from={path}: {e}") from None
    refused, allowed = config_differences(src.cfg, model_cfg)
    if refused:
        raise InitFromError(
            f"train.init_from={path}: the source's model does not fit this run's: {'; '.join(refused)}; "
            f"set these model fields to the source's values (or start from another source)")
    notes = [f"differs (allowed): {d}" for d in allowed]
    if isinstance(src, DcpWeights) and src.ref.model_cfg is None:
        notes.append("no config.yaml beside the checkpoint: checked tensor shapes against the run's model only")
    return src, notes


def check_init_from(path: str, model_cfg: ModelConfig) -> InitSource:
    """Fail fast on the driver: the source exists, is complete, and fits `model_cfg`. Reads configs
    and metadata only, no tensors. For a training checkpoint `path` comes back pinned to the step
    directory `latest` names now, so every worker (and every retry) loads the same weights; a
    local path comes back absolute (workers run in Ray's own working directories)."""
    src, notes = _open_checked(path, model_cfg)
    where = src.where if "://" in src.where else os.path.abspath(src.where)
    return InitSource(where, src.kind, src.step, notes)


class _EngineState(Mapping):
    """What TrainEngine.load_state_dict reads: "model.<fqn>" for this rank's parameters, one whole
    tensor at a time (a rank holds one tensor beyond its shard), as the source stores it. The engine
    casts into its parameters and, in bf16 runs, starts each fp32 master copy from the same value,
    so an fp32 source stays exact there (the source is read once more for the masters). No
    optimizer key: AdamW's moments and step count start fresh."""

    def __init__(self, src: WeightSource, fqns: List[str]):
        self.src, self.tensors, self.bytes = src, 0, 0
        self._fqn = {f"model.{f}": f for f in fqns}

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.src.get(self._fqn[key])
        self.tensors, self.bytes = self.tensors + 1, self.bytes + t.numel() * t.element_size()
        return t

    def __contains__(self, key) -> bool:
        return key in self._fqn

    def __iter__(self):
        return iter(self._fqn)

    def __len__(self) -> int:
        return len(self._fqn)


def load_initial_weights(engine, path: str) -> InitSummary:
    """Fill `engine` (a TrainEngine, any layout) with the weights at `path`, on every rank.
    Each rank reads only the tensors its pipeline stage holds and keeps its shard of each.
    Call once, right after building the engine, and only when not resuming. Not collective."""
    start = time.perf_counter()
    src, notes = _open_checked(path, engine.model_cfg)
    view = _EngineState(src, [fqn for fqn, _ in engine.named_parameters()])
    engine.load_state_dict(view, strict=False)
    return InitSummary(src.where, src.kind, src.step, notes, view.tensors, view.bytes, time.perf_counter() - start)
