"""The executor interface over a gang of Ray stage actors: a model too large for one device.

    executor = RayExecutor("out/mixtral", model_cfg, ServeLayout(pp=2, ep=2), num_blocks=1024, block_size=16)
    res = executor.execute(chunks)                         # as ModelExecutor.execute
    h1 = executor.submit(a); h2 = executor.submit(b)       # up to max_inflight (= pp) steps at once
    r1 = executor.collect(h1); r2 = executor.collect(h2)   # in submission order

Each step's chunks (token ids, positions, block tables: never KV data) go once into Ray's object
store and every rank of the gang reads them; activations then travel rank to rank over
torch.distributed inside the gang, and only the last stage's logits (and each stage's expert
counts) come back. With pp stages, pp steps in flight keep every stage busy, as vLLM runs pp
batches at once; the engine core keeps the requests of in-flight steps disjoint.

Faults: a rank or its node dies -> the gang notices through Ray's actor death, rebuilds itself
(weights reloaded from `path`) and this raises ExecutorFailure; the KV cache is empty again and
every handle submitted before is void (the core drops them; collecting one raises
ExecutorFailure again, with rebuild_seconds 0). `health()` reports the gang for the Serve layer.

Ray is imported only here and in moray.actors, lazily, so the in-process engine imports without it.
The logits come back to the driver on the CPU, so `device` is the CPU whatever the actors run on
(`actor_device`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from moray.model.config import ModelConfig
from moray.serve.engine.executor import ExecutorFailure, SeqChunk, StepResult

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class RayStepHandle:
    """What submit() hands back: the gang's refs, or (an empty step) the result itself."""

    step: object = None  # moray.actors.serve_gang.GangStep
    result: Optional[StepResult] = None
    # Filled by collect, per stage: its leader's wall seconds for the step, and the part of them
    # it spent waiting for the previous stage's activations (busy = seconds - wait).
    stage_seconds: List[float] = field(default_factory=list)
    stage_wait_seconds: List[float] = field(default_factory=list)


class RayExecutor:
    def __init__(self, path: str, model_cfg: Optional[ModelConfig], layout, num_blocks: int, block_size: int,
                 dtype: Optional[torch.dtype] = None, device: str = "cpu", cpus_per_actor: int = 1,
                 address: Optional[str] = None, **gang_options):
        """layout: a moray.parallel.serving.ServeLayout (pp, tp, ep). model_cfg None: read beside the
        weights. dtype None: the weights' stored dtype. device: where the actors compute ("cpu" or
        "cuda"). address: a Ray cluster (else RAY_ADDRESS, else an embedded local one sized to hold
        the gang). gang_options: StageGang's timeouts, standby, and transport ("gloo", the default,
        or "cgraph": each step one Ray compiled graph; serve_gang.py says which measures better)."""
        from moray.actors.serve_gang import StageGang
        from moray.platform.cluster import connect

        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be at least 1")
        if dtype is not None and dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype {dtype}: serving needs one of {sorted(_DTYPE_NAMES.values())}")
        if model_cfg is None:  # the config beside the weights (opened, not read)
            from moray.serve.engine.loader import open_source

            model_cfg = open_source(str(path)).cfg
        layout.validate(model_cfg)
        self.path, self.model_cfg, self.layout = str(path), model_cfg, layout
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device, self.actor_device = torch.device("cpu"), str(device)
        self.max_inflight = layout.pp
        connect(address, min_cpus=layout.world_size * cpus_per_actor)
        self.gang = StageGang(self.path, model_cfg, layout, num_blocks, block_size,
                              _DTYPE_NAMES[dtype] if dtype is not None else None,
                              self.actor_device, cpus_per_actor, **gang_options)
        self.gang.start()
        # dtype None: the weights' stored dtype, as the ranks loaded them
        self.dtype = dtype or getattr(torch, self.gang.infos[0]["dtype"])

    @property
    def kv_bytes_per_token(self) -> int:
        """What one cached token costs the model (2 x layers x KV heads x head_dim x element size), as
        ModelExecutor counts it; `stage_kv_bytes_per_token` is each stage's share, as its actor has it."""
        c = self.model_cfg
        return 2 * c.n_layers * c.n_kv_heads * c.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def stage_kv_bytes_per_token(self) -> List[int]:
        return [i["kv_bytes_per_token"] for i in self._stage_heads()]

    def _stage_heads(self) -> List[dict]:
        """The info of each stage's (tp 0, ep 0) rank, in stage order."""
        tp, ep = self.layout.tp, self.layout.ep
        return [self.gang.infos[s * ep * tp] for s in range(self.layout.pp)]

    # ------------------------------------------------------------ steps

    def execute(self, chunks: List[SeqChunk]) -> StepResult:
        return self.collect(self.submit(chunks))

    def submit(self, chunks: List[SeqChunk]) -> RayStepHandle:
        if not any(c.token_ids for c in chunks):
            return RayStepHandle(result=StepResult(torch.empty(0, self.model_cfg.vocab_size), None, [], 0.0))
        return RayStepHandle(step=self.gang.submit(list(chunks)))

    def collect(self, handle: RayStepHandle) -> StepResult:
        from moray.actors.serve_gang import GangFailure

        if handle.result is not None:
            return handle.result
        try:
            outputs = self.gang.wait(handle.step)
        except GangFailure as f:
            raise ExecutorFailure(f.cause, f.rebuild_seconds) from f
        stages = sorted((o for o in outputs if o is not None), key=lambda o: o.stage)
        if len(stages) != self.layout.pp or stages[-1].logits is None:
            raise RuntimeError(f"the gang returned outputs of stages {[o.stage for o in stages]} (logits "
                               f"{'missing' if not stages or stages[-1].logits is None else 'present'}); expected "
                               f"one per stage 0..{self.layout.pp - 1}, logits from the last")
        experts = [o.expert_tokens for o in stages if o.expert_tokens is not None]
        expert_tokens = torch.cat(experts) if experts else None
        touched = (expert_tokens > 0).sum(-1).tolist() if expert_tokens is not None else []
        handle.result = StepResult(stages[-1].logits, expert_tokens, touched,
                                   time.perf_counter() - handle.step.submitted_at)
        handle.stage_seconds = [o.seconds for o in stages]
        handle.stage_wait_seconds = [getattr(o, "wait_seconds", 0.0) for o in stages]
        return handle.result

    # ------------------------------------------------------------ the Serve layer

    def health(self) -> dict:
        """From the gang's own state (no round trip: a probe would queue behind running steps)."""
        return {"alive": self.gang.alive, "generation": self.gang.generation, "layout":
                {"pp": self.layout.pp, "tp": self.layout.tp, "ep": self.layout.ep},
                "actors": self.gang.describe(), "standbys": len(self.gang.standby),
                "events": list(self.gang.events)}

    def shutdown(self) -> None:
        self.gang.shutdown()


__all__ = ["RayExecutor", "RayStepHandle"]
