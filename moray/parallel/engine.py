"""TrainEngine: one rank's part of the model, its optimizer, and the training step.

    engine = TrainEngine(model_cfg, parallel_cfg, dims, rank, device, seed, lr, ...)
    out = engine.step(tokens)          # (local_batch, seq_len + 1) for this rank's dp index
    sd = engine.state_dict()           # DCP: dcp.load(sd, ...) fills the engine in place

Building (torchtitan's order, each step an apply_* from outside the model):
the whole Transformer on the meta device -> cut to this rank's pipeline
stage(s) -> keep this rank's experts (EP) -> split heads and FFN columns (TP,
with sequence parallelism when configured) -> split the embedding, the head and
the loss over the vocabulary (at tp > 1, always: vocab_parallel.py), all still
on meta -> materialise: allocate only this share, in the compute dtype, and fill
it with its slice of the whole model's initial values (keyed by name and global
expert id: materialise.py) -> activation checkpointing -> optimizer (data
parallel, ZeRO-1).

dtype "bfloat16" is bf16 end to end: weights, activations, what crosses the
expert all-to-all and the pipeline, and gradients; the optimizer keeps fp32
master weights and AdamW state for its ZeRO share (mixed_precision.py).
"float32" is float32 throughout.

A step: the local batch is split into `microbatches` equal contiguous chunks;
each chunk's loss is its mean next-token cross-entropy divided by the number of
microbatches, and the router losses take the same scale (set_aux_grad_scale).
The load-balancing loss is therefore computed per microbatch per dp rank, over
that chunk's tokens: a single-process run matches only when it routes the same
chunks (tests/dist_utils.reference_run). Gradients are averaged over the
data-parallel copies in buckets while the last microbatch's backward runs
(grad_reduce.py; under ZeRO-1 each rank receives only its share), then clipped
by the global norm, and the optimizer steps, unless the loss or the norm is not
finite and skip_nonfinite is set.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Dict, List, Optional, Sequence, Set

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moray.model.config import ModelConfig
from moray.model.moe import MoE, set_aux_grad_scale
from moray.model.transformer import Transformer
from moray.parallel.config import ParallelConfig
from moray.parallel.dims import LayoutError, ParallelDims
from moray.parallel.expert_parallel import apply_ep
from moray.parallel.materialise import materialise
from moray.parallel.memory import SavedTensorMeter, tensor_bytes
from moray.parallel.pipeline import (PipelineRunner, bubble_fraction, keep_stage, partition_layers, stage_ids,
                                     virtual_stages_of)
from moray.parallel.recompute import apply_recompute
from moray.parallel.sharding import full_tensor, local_view, param_specs, to_dtensor
from moray.parallel.tensor_parallel import apply_tp
from moray.parallel.vocab_parallel import apply_vocab_parallel, vocab_parallel_cross_entropy, vocab_range
from moray.parallel.zero import DataParallelOptimizer

OPTIM_KEYS = ("master", "exp_avg", "exp_avg_sq", "step")  # "master": bf16 runs only
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_schedule(parallel_cfg: ParallelConfig, dims: ParallelDims) -> None:
    p, m = parallel_cfg, parallel_cfg.num_microbatches
    if p.schedule not in ("1f1b", "gpipe", "interleaved_1f1b"):
        raise LayoutError(f"parallel.schedule {p.schedule!r}: use 1f1b, gpipe or interleaved_1f1b")
    if dims.pp > 1 and p.schedule == "1f1b" and m < dims.pp:
        raise LayoutError(f"1F1B needs at least pp = {dims.pp} microbatches (got {m}); set parallel.microbatches "
                          f">= {dims.pp}")
    if dims.pp > 1 and p.schedule == "interleaved_1f1b" and (p.virtual_stages < 1 or m % dims.pp):
        raise LayoutError(f"interleaved 1F1B needs virtual_stages >= 1 and microbatches a multiple of pp = "
                          f"{dims.pp} (got {p.virtual_stages}, {m})")


def check_layout(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, dims: ParallelDims) -> None:
    """Everything about the layout a rank checks before building (a dry run checks the same):
    the dims against the model, and the schedule. Raises LayoutError saying what would fit."""
    virtual = virtual_stages_of(parallel_cfg) if dims.pp > 1 else 1
    dims.validate(model_cfg, virtual_stages=virtual, sequence_parallel=sequence_parallel_of(parallel_cfg, dims))
    check_schedule(parallel_cfg, dims)


def build_model_parts(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, dims: ParallelDims, rank: int,
                      meshes, device: torch.device, seed: int, dtype: torch.dtype = torch.float32,
                      stage_layers: Optional[List[range]] = None) -> List[Transformer]:
    """This rank's stage(s): only its layers, experts and tensor shards, allocated in `dtype` and
    initialised as the whole model is (materialise.py). device "meta" leaves them unallocated (a
    dry run), and meshes None builds without process groups (such a part must not run).
    stage_layers: partition_layers' split, from a caller that builds many ranks (a dry run)."""
    c = dims.coords(rank)
    virtual = virtual_stages_of(parallel_cfg) if dims.pp > 1 else 1
    n_stages = dims.pp * virtual
    sp = sequence_parallel_of(parallel_cfg, dims)
    ranges = stage_layers or partition_layers(model_cfg, n_stages, tp=dims.tp, sequence_parallel=sp)
    group = meshes.group if meshes is not None else (lambda name: None)
    parts = []
    for sid in stage_ids(c.pp, dims.pp, virtual):
        with torch.device("meta"):
            part = Transformer(model_cfg, layers=ranges[sid])
        keep_stage(part, ranges[sid], first=sid == 0, last=sid == n_stages - 1)
        shard_stage(part, dims, c, group, sp)
        if torch.device(device).type != "meta":
            materialise(part, seed, device, dtype, c.tp, dims.tp)
        if parallel_cfg.activation_checkpointing:
            apply_recompute(part, parallel_cfg.recompute, parallel_cfg.recompute_every)
        part.stage_index = sid
        parts.append(part)
    return parts


def shard_stage(part: Transformer, dims: ParallelDims, c, group, sequence_parallel: bool) -> None:
    """Cut a stage (on meta: no memory) to rank `c`'s experts (EP) and tensor shards (TP, the
    vocabulary at tp > 1); group(name) gives the process group of an axis."""
    apply_ep(part, group("ep"), c.ep, dims.ep)
    apply_tp(part, group("tp"), c.tp, dims.tp, sequence_parallel=sequence_parallel,
             experts=(group("etp"), c.etp, dims.etp))
    apply_vocab_parallel(part, group("tp"), c.tp, dims.tp, sequence_parallel=sequence_parallel)


def sequence_parallel_of(parallel_cfg: ParallelConfig, dims: ParallelDims) -> bool:
    """Sequence parallelism is on when asked for and there are tensor ranks to split over (at tp 1
    the flag changes nothing)."""
    return bool(parallel_cfg.sequence_parallel) and dims.tp > 1


def _in_backward() -> bool:
    """True while autograd runs a backward pass on this thread."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class _RouterStats:
    """Sums each MoE forward's router statistics over a step (forward hooks, from outside).
    A block recomputed by activation checkpointing runs inside backward: not counted twice."""

    def __init__(self, parts: Sequence[nn.Module], n_experts: int, device: torch.device):
        self.n_experts, self.device = n_experts, device
        for part in parts:
            for m in part.modules():
                if isinstance(m, MoE):
                    m.register_forward_hook(self._collect)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(3 + self.n_experts, dtype=torch.float64, device=self.device)

    def _collect(self, moe, args, out) -> None:
        if _in_backward():  # a recomputation by activation checkpointing
            return
        s = moe.last_stats
        self.sums[0] += s["load_balancing_loss"].double()
        self.sums[1] += s["z_loss"].double()
        self.sums[2] += 1
        self.sums[3:] += s["tokens_per_expert"].double()


class TrainEngine:
    """One rank of a training job (the process group is already initialised; Ray Train does it).

    Attributes callers use: model_parts (this rank's Transformer stage(s), parameter names the
    whole model's), dims, coords (this rank's pp/dp/tp/ep/edp position), meshes,
    num_microbatches, bubble_fraction ((p - 1) / (v m + p - 1)) and measured_bubble_fraction
    (1 - busy / step time, mean over stages, last step; None until a pipelined step ran).
    """

    def __init__(self, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, dims: ParallelDims, rank: int,
                 device, seed: int = 0, lr: float = 3e-4, betas: Sequence[float] = (0.9, 0.95),
                 weight_decay: float = 0.1, grad_clip: Optional[float] = 1.0, dtype: str = "float32",
                 eps: float = 1e-8):
        if not dist.is_initialized():
            raise RuntimeError("TrainEngine needs torch.distributed initialised (Ray Train does it; alone: "
                               "dist.init_process_group('gloo' or 'nccl', rank=..., world_size=...))")
        if dist.get_world_size() != dims.world_size or dist.get_rank() != rank:
            raise LayoutError(f"process group has world size {dist.get_world_size()} and rank {dist.get_rank()}, "
                              f"but the engine was given world size {dims.world_size} and rank {rank}")
        p = parallel_cfg
        if (p.tp, p.pp, p.ep, p.etp or p.tp) != (dims.tp, dims.pp, dims.ep, dims.etp) or \
                (p.dp is not None and p.dp != dims.dp):
            raise LayoutError(f"parallel config (tp {p.tp}, pp {p.pp}, ep {p.ep}, etp {p.etp}, dp {p.dp}) disagrees "
                              f"with dims {dims.describe()}; build dims with ParallelDims.from_config(parallel_cfg, "
                              f"world_size)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: use float32 or bfloat16")
        virtual = virtual_stages_of(p) if dims.pp > 1 else 1
        check_layout(model_cfg, p, dims)

        self.model_cfg, self.parallel_cfg, self.dims, self.rank = model_cfg, p, dims, rank
        self.device = torch.device(device)
        self.coords = dims.coords(rank)
        self.grad_clip = grad_clip
        self.dtype = dtype
        self.compute_dtype = DTYPES[dtype]
        self.num_microbatches = p.num_microbatches
        self.sequence_parallel = sequence_parallel_of(p, dims)
        # This rank's vocabulary rows of the head and the loss (vocab_parallel.py); None at tp 1.
        self.vocab_rows = vocab_range(model_cfg.vocab_size, self.coords.tp, dims.tp) if dims.tp > 1 else None
        self.meshes = dims.build_mesh(self.device.type)
        self.model_parts = build_model_parts(model_cfg, p, dims, rank, self.meshes, self.device, seed,
                                             self.compute_dtype)
        for part in self.model_parts:
            set_aux_grad_scale(part, 1.0 / self.num_microbatches)
        self._params = param_specs(self.model_parts, dims)
        # Gradients reduce in buckets during the last microbatch's backward (grad_reduce.py), a stage's apart.
        stage_of = {fqn: part.stage_index for part in self.model_parts for fqn, _ in part.named_parameters()}
        self.optimizer = DataParallelOptimizer(self._params, dims, self.meshes, self.coords, lr=lr, betas=betas,
                                               eps=eps, weight_decay=weight_decay, zero=p.zero,
                                               master_weights=self.compute_dtype != torch.float32,
                                               stage_of=stage_of, bucket_bytes=int(p.grad_bucket_mb * (1 << 20)),
                                               overlap=p.overlap_grad_reduce)
        self._stats = _RouterStats(self.model_parts, model_cfg.n_experts, self.device)
        self.bubble_fraction = bubble_fraction(dims.pp, self.num_microbatches, virtual)
        self.measured_bubble_fraction: Optional[float] = None
        self._pipeline = None
        if dims.pp > 1:
            head_rows = None if self.vocab_rows is None else self.vocab_rows[1] - self.vocab_rows[0]
            self._pipeline = PipelineRunner(self.model_parts, model_cfg, p, dims.pp, self.meshes.group("pp"),
                                            self.device, self.compute_dtype, self._loss_fn,
                                            seq_shards=dims.tp if self.sequence_parallel else 1, vocab_rows=head_rows,
                                            before_last_backward=self.optimizer.reducer.arm)
        self._grad_bytes = self._activation_peak = 0
        self._bubble_local = 0.0
        self.timings: Dict[str, float] = {}  # the last step's forward + backward and reduction tail, seconds

    def _loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One microbatch's mean next-token cross-entropy, scaled by 1 / microbatches. At tp > 1 the
        logits are this rank's vocabulary rows (B, T, Vr) and the loss is the same on every tensor rank."""
        if self.vocab_rows is None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        else:
            loss = vocab_parallel_cross_entropy(logits.flatten(0, 1), targets.flatten(), self.vocab_rows[0],
                                                self.meshes.group("tp")).mean()
        return loss / self.num_microbatches

    def _forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> List[torch.Tensor]:
        if self._pipeline is not None:
            losses, self._bubble_local = self._pipeline.run(inputs, targets)
            return losses
        m = self.num_microbatches
        losses = []
        model = self.model_parts[0]
        for i, (x, y) in enumerate(zip(inputs.tensor_split(m), targets.tensor_split(m))):
            loss = self._loss_fn(model(x), y)
            if i == m - 1:  # gradients are final in this backward: reduce them as they come
                self.optimizer.reducer.arm()
            loss.backward()
            losses.append(loss.detach())
        return losses

    # ------------------------------------------------------------ the step

    def set_lr(self, lr: float) -> None:
        self.optimizer.set_lr(lr)

    def step(self, tokens: torch.Tensor, skip_nonfinite: bool = True) -> Dict:
        """One optimizer step on `tokens` (local_batch, seq_len + 1), this rank's dp share. Collective.

        Returns the same dict on every rank: loss (mean cross-entropy over the global batch),
        aux_loss and z_loss (router losses, means over MoE layers, microbatches and dp ranks),
        grad_norm (before clipping), skipped, tokens_per_expert (global experts, summed over
        layers and the global batch), num_tokens (global targets), bubble_measured (pp > 1).
        """
        m = self.num_microbatches
        if tokens.dim() != 2 or tokens.shape[0] % m:
            raise ValueError(f"tokens {tuple(tokens.shape)}: need (local_batch, seq_len + 1) with local_batch a "
                             f"multiple of parallel.microbatches = {m}")
        if self.sequence_parallel and (tokens.shape[1] - 1) % self.dims.tp:
            raise ValueError(f"sequence parallelism splits each sequence over tp = {self.dims.tp} ranks, but "
                             f"seq_len {tokens.shape[1] - 1} is not a multiple of {self.dims.tp}; use a multiple "
                             f"or parallel.sequence_parallel=false")
        tokens = tokens.to(self.device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        self.optimizer.zero_grad()
        self._stats.reset()
        meter = None
        if self.device.type == "cpu":
            meter = SavedTensorMeter(p for p, _ in self._params.values())
        elif self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        with meter or contextlib.nullcontext():
            losses = self._forward_backward(inputs, targets)
        if meter is not None:
            self._activation_peak = meter.peak
        backward_done = time.perf_counter()
        self.optimizer.reduce_gradients()
        # What the reduction added after the backward: all of it without overlap, the tail with it.
        self.timings = {"forward_backward_s": backward_done - started,
                        "reduction_wait_s": time.perf_counter() - backward_done}
        out = self._reduce_metrics(losses, num_tokens=targets.numel() * self.dims.dp)
        finite = math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
        out["skipped"] = bool(skip_nonfinite and not finite)
        self._grad_bytes = self.optimizer.reducer.grad_bytes()  # held whole in the backward, before reduction
        if out["skipped"]:
            self.optimizer.zero_grad()
            return out
        if self.grad_clip and finite:
            coef = self.grad_clip / (out["grad_norm"] + 1e-6)
            if coef < 1.0:
                self.optimizer.scale_gradients(coef)
        self.optimizer.step()
        return out

    def _reduce_metrics(self, losses: List[torch.Tensor], num_tokens: int) -> Dict:
        """One all-reduce over the world for everything the step reports."""
        E = self.model_cfg.n_experts
        v = torch.zeros(6 + E, dtype=torch.float64, device=self.device)
        first_tp = self.coords.tp == 0
        if losses and first_tp:
            v[0] = torch.stack(losses).sum().double()
        if first_tp:
            v[1:4] = self._stats.sums[:3]
            v[6:] = self._stats.sums[3:]
        v[4] = self.optimizer.local_norm_sq()
        if self.dims.pp > 1 and first_tp and self.coords.dp == 0:
            v[5] = self._bubble_local
        dist.all_reduce(v)
        v = v.tolist()
        calls = v[3]
        moe = self.model_cfg.is_moe and calls > 0
        out = {
            "loss": v[0] / self.dims.dp,
            "aux_loss": v[1] / calls if moe else 0.0,
            "z_loss": v[2] / calls if moe else 0.0,
            "grad_norm": math.sqrt(v[4]) if v[4] >= 0 else float("nan"),
            "skipped": False,
            "tokens_per_expert": [int(round(x)) for x in v[6:]] if self.model_cfg.is_moe else [],
            "num_tokens": int(num_tokens),
        }
        if self.dims.pp > 1:
            self.measured_bubble_fraction = v[5] / self.dims.pp
            out["bubble_measured"] = self.measured_bubble_fraction
        return out

    # ------------------------------------------------------------ state

    def named_parameters(self):
        """(fqn, local parameter) over this rank's parts; FQNs are the whole model's."""
        return [(fqn, p) for fqn, (p, _) in self._params.items()]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Flat dict for torch.distributed.checkpoint, sharing storage with the engine.

        "model.<fqn>": every local parameter (in the compute dtype); "optim.<fqn>.exp_avg" /
        "exp_avg_sq" / "step", and in bf16 runs "master" (the fp32 weight): the AdamW state this rank
        keeps (its ZeRO share). Shards are DTensors (experts Shard(0) over ep, tensor-parallel shards
        Shard(dim) over tp), so DCP reshards into any layout. Because the values alias the engine's
        tensors, `dcp.load(engine.state_dict(), ...)` restores the engine in place; load_state_dict(sd)
        then has nothing left to copy (calling it is still right).
        """
        sd: Dict[str, torch.Tensor] = {}
        for fqn, (p, spec) in self._params.items():
            sd[f"model.{fqn}"] = to_dtensor(p.detach(), spec, self.meshes)
        for fqn, st in self.optimizer.owned_state().items():
            for k in OPTIM_KEYS:
                if k in st:  # a ZeRO piece's state is Shard(dim) over its copies besides (zero.py)
                    sd[f"optim.{fqn}.{k}"] = self.optimizer.to_dtensor(fqn, st[k]) if k != "step" else st[k]
        return sd

    def state_dict_for(self, sd: Dict[str, torch.Tensor], in_checkpoint: Set[str]) -> Dict[str, torch.Tensor]:
        """A DCP template (from state_dict()) for a checkpoint holding the keys `in_checkpoint`: a
        bf16 engine reading one without master weights (a float32 run's) reads those weights in
        float32, so that load_state_dict keeps them exactly in the masters; a float32 engine
        never asks for masters. The other keys stay as they are (DCP names any that are missing)."""
        out = dict(sd)
        for key in [k for k in sd if k.endswith(".master") and k not in in_checkpoint]:
            del out[key]
            weight = "model." + key[len("optim."):-len(".master")]
            if weight in out:
                out[weight] = out[weight].to(torch.float32)  # a copy, in this rank's layout
        return out

    @torch.no_grad()
    def load_state_dict(self, sd: Dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy `sd` into the engine. Values may be this layout's (DTensor or local shards, e.g. after
        dcp.load into state_dict()) or whole tensors (full_state_dict of any layout), which are cut
        to this rank's shard. strict=False allows missing optimizer keys (weights only).

        Either dtype loads into either: values are cast. A bf16 engine given no master weight (a
        float32 checkpoint, or weights only) starts its master from "model.<fqn>" as given, so a
        float32 weight is kept exactly; a float32 engine ignores master keys and takes the weights
        (the masters are ZeRO shards a replica may not have, and replicas must agree). Through DCP
        (which casts on load), a float32 checkpoint into a bf16 engine needs a template without the
        "optim.*.master" keys the checkpoint lacks; never load partially into the full template: its
        masters would keep their initial values and the next step would write them back."""
        from torch.distributed.tensor import DTensor

        # key -> (destination, how to cut a whole or local tensor to it, the key to read when key is absent)
        model_view = lambda spec: lambda src: local_view(src, spec, self.dims, self.coords)  # noqa: E731
        state_view = lambda fqn: lambda src: self.optimizer.state_view(fqn, src)  # noqa: E731
        targets = {f"model.{fqn}": (p.data, model_view(spec), None) for fqn, (p, spec) in self._params.items()}
        for fqn, st in self.optimizer.owned_state().items():
            for k in OPTIM_KEYS:
                if k in st:
                    targets[f"optim.{fqn}.{k}"] = (st[k], state_view(fqn), f"model.{fqn}" if k == "master" else None)
        missing = [k for k, (_, _, fallback) in targets.items()
                   if k not in sd and fallback not in sd and (strict or k.startswith("model."))]
        if missing:
            raise KeyError(f"state dict lacks {len(missing)} of this rank's keys, e.g. {missing[:3]}")
        for key, (dst, view, fallback) in targets.items():
            src = sd.get(key, sd.get(fallback) if fallback else None)
            if src is None:
                continue
            if isinstance(src, DTensor):
                src = src.to_local()
            if src.shape != dst.shape and dst.dim() > 0:
                src = view(src)
            if src.shape != dst.shape:
                raise ValueError(f"{key}: got shape {tuple(src.shape)}, this rank holds {tuple(dst.shape)}")
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)

    def full_state_dict(self, grads: bool = False) -> Dict[str, torch.Tensor]:
        """The whole model's parameters (CPU, FQN -> tensor, as Transformer.state_dict() names them) on
        every rank; grads=True gives their gradients as of the last step instead (averaged, clipped).
        Collective; gathers everything, so for tests, export and small models."""
        local = {}
        for fqn, (p, spec) in self._params.items():  # gradients: ZeRO pieces gathered (zero.py)
            local[fqn] = (self.optimizer.full_grad(fqn) if grads else full_tensor(p.detach(), spec, self.meshes)).cpu()
        if self.dims.pp > 1:
            parts: List[Optional[Dict]] = [None] * self.dims.pp
            dist.all_gather_object(parts, local, group=self.meshes.group("pp"))
            local = {k: v for part in parts for k, v in part.items()}
        if self.model_cfg.tie_embeddings and "tok_embeddings.weight" in local:
            local["output.weight"] = local["tok_embeddings.weight"]
        return local

    # ------------------------------------------------------------ reports

    def memory_report(self) -> Dict[str, int]:
        """Bytes on this rank: params, grads (as of the last step), optimizer (its ZeRO share),
        activations_peak (saved for backward in the last step) and total_peak."""
        params = tensor_bytes(p for p, _ in self._params.values())
        optim = self.optimizer.state_bytes()
        fixed = params + self._grad_bytes + optim
        if self.device.type == "cuda":
            total = torch.cuda.max_memory_allocated(self.device)
            activations = max(0, total - fixed)
        else:
            activations = self._activation_peak
            total = fixed + activations
        return {"params": params, "grads": self._grad_bytes, "optimizer": optim,
                "activations_peak": activations, "total_peak": total}
