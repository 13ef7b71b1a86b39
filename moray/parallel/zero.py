"""Data parallelism on the optimizer side: gradient averaging, global clipping, AdamW, ZeRO-1.

Gradients. Each rank's loss is the mean over its own microbatches, so the
global objective is the mean over the dp ranks. A dense parameter has a copy on
every dp rank: sum its gradient over dp, divide by dp. An expert lives on one
rank of each expert group, and that rank's gradient already sums what every
peer of the group sent it through the all-to-all; the dp / ep copies of the
expert (the edp group) each saw a different expert group. So: sum over edp,
divide by dp (not by edp). Before either, a weight kept whole on every tensor
rank but used by only its own heads there (MQA's K/V) sums its gradient over tp.

Clipping. The global norm counts each distinct value once: a rank adds the
squares of what it holds if it is the first copy of that tensor (dp rank 0 for
dense, edp rank 0 for experts, tp rank 0 for what tp does not split); one sum
over the world then covers pp stages, tp shards and expert shards.

Optimizer. AdamW, weight decay on matrices only (norm weights are exempt);
with bf16 parameters, MasterWeightAdamW (fp32 master weights and state, see
mixed_precision.py). zero=1 shards the state with ZeroRedundancyOptimizer:
dense parameters over dp, experts over edp (the only ranks with the same
experts); zero=0 keeps all state on every rank. All state lives on the
parameters' device.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moray.parallel.dims import Coords, Meshes, ParallelDims
from moray.parallel.mixed_precision import MasterWeightAdamW, adamw_options, new_adamw_state
from moray.parallel.sharding import ParamSpec

BUCKET_BYTES = 64 << 20  # gradient all-reduces go in flat buckets of at most this size


def _buckets(tensors: List[torch.Tensor]) -> Iterator[List[torch.Tensor]]:
    """Consecutive runs of one dtype, each at most BUCKET_BYTES (or a single larger tensor)."""
    bucket: List[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > BUCKET_BYTES or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def _all_reduce_flat(tensors: List[torch.Tensor], group) -> None:
    """Sum `tensors` in place over `group`, one flat buffer per bucket."""
    for bucket in _buckets(tensors):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        for t, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(reduced)


class DataParallelOptimizer:
    def __init__(self, named: Dict[str, Tuple[nn.Parameter, ParamSpec]], dims: ParallelDims,
                 meshes: Meshes, coords: Coords, *, lr: float, betas: Sequence[float], eps: float,
                 weight_decay: float, zero: int, master_weights: bool = False):
        self.named, self.dims, self.meshes, self.coords = named, dims, meshes, coords
        self.zero = zero
        optim_class = MasterWeightAdamW if master_weights else torch.optim.AdamW
        self.fqn_of = {id(p): fqn for fqn, (p, _) in named.items()}
        self.optimizers: List[torch.optim.Optimizer] = []
        kinds = [[(p, s) for p, s in named.values() if s.expert == expert] for expert in (False, True)]
        for kind in kinds:
            if not kind:
                continue
            params = [p for p, _ in kind]
            groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
            groups = [g for g in groups if g["params"]]
            fused = adamw_options(params[0].device)
            if zero:
                from torch.distributed.optim import ZeroRedundancyOptimizer

                group = meshes.group(kind[0][1].replica_group)
                opt = ZeroRedundancyOptimizer(groups, optim_class, process_group=group,
                                              lr=lr, betas=tuple(betas), eps=eps, **fused)
            else:
                opt = optim_class(groups, lr=lr, betas=tuple(betas), eps=eps, **fused)
            self.optimizers.append(opt)
        self._init_state()

    # ------------------------------------------------------------ gradients

    def zero_grad(self) -> None:
        for p, _ in self.named.values():
            p.grad = None

    def reduce_gradients(self) -> None:
        """Partial sums over tp, then the average over data-parallel copies (see module doc)."""
        for p, _ in self.named.values():
            if p.grad is None:  # every rank must join every bucket
                p.grad = torch.zeros_like(p)
        partial = [p.grad for p, s in self.named.values() if s.tp_partial]
        if partial and self.dims.tp > 1:
            _all_reduce_flat(partial, self.meshes.group("tp"))
        for expert in (False, True):
            grads = [p.grad for p, s in self.named.values() if s.expert == expert]
            group_name = "edp" if expert else "dp"
            if grads and self.dims.dp > 1:
                if getattr(self.dims, group_name) > 1:
                    _all_reduce_flat(grads, self.meshes.group(group_name))
                torch._foreach_div_(grads, float(self.dims.dp))

    def local_norm_sq(self) -> torch.Tensor:
        """This rank's share of the global squared gradient norm (float64; sum it over the world).
        Each tensor's norm is taken in float32 whatever the gradients' dtype."""
        mine = []
        for p, s in self.named.values():
            first_copy = (self.coords.edp if s.expert else self.coords.dp) == 0
            if s.tp_dim is None:
                first_copy = first_copy and self.coords.tp == 0
            if first_copy and p.grad is not None:
                mine.append(p.grad.detach())
        if not mine:
            return torch.zeros((), dtype=torch.float64, device=self._device())
        return torch.stack([n.double() for n in torch._foreach_norm(mine, dtype=torch.float32)]).pow(2).sum()

    def scale_gradients(self, factor: float) -> None:
        grads = [p.grad for p, _ in self.named.values() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    # ------------------------------------------------------------ steps

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr

    def _local(self, opt) -> torch.optim.Optimizer:
        """The optimizer that holds state: ZeRO's local one, or opt itself."""
        return getattr(opt, "optim", opt)

    def _init_state(self) -> None:
        """Create AdamW's state now (as its first step would), so checkpoints have templates.
        MasterWeightAdamW makes its own when it is built."""
        for opt in self.optimizers:
            local = self._local(opt)
            for g in local.param_groups:
                for p in g["params"]:
                    if not local.state.get(p):
                        local.state[p] = new_adamw_state(p, master=False)

    def owned_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """fqn -> AdamW state, for the parameters whose state this rank keeps."""
        out = {}
        for opt in self.optimizers:
            local = self._local(opt)
            for g in local.param_groups:
                for p in g["params"]:
                    out[self.fqn_of[id(p)]] = local.state[p]
        return out

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.owned_state().values() for t in st.values()
                   if torch.is_tensor(t))

    def _device(self) -> torch.device:
        return next(iter(self.named.values()))[0].device
