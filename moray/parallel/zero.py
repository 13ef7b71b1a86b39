"""Data parallelism on the optimizer side: global clipping, AdamW, ZeRO-1's sharded state.

Gradients are reduced by grad_reduce.GradReducer (overlapped with the backward:
averaged over the data-parallel copies, partial sums over tp included). This
optimizer holds, for each parameter, the piece whose state this rank keeps:

- zero=1: the parameter's ZeRO piece (its rows along one dimension, 1/n of it
  for a group of n copies: dense parameters over dp, partial ones over dp x tp,
  experts over edp), whose reduced gradient the reduce-scatter delivered. The
  step updates the pieces and all-gathers the parameters back (grad_reduce).
- zero=0 (or a group of one rank): the whole local parameter, gradient all-reduced.

Clipping. The global norm counts each distinct value once: a rank adds the
squares of what it holds if it is the first copy of it (a ZeRO piece is nobody
else's; a whole gradient counts on the first rank of its copies; tp rank 0 for
what tp neither splits nor shards); one sum over the world then covers pp
stages, tp shards, expert shards and ZeRO pieces.

Optimizer. AdamW, weight decay on matrices only (norm weights are exempt);
with bf16 parameters an fp32 master copy of each piece (mixed_precision.py).
State lives on the parameters' device.

Checkpoints. Each piece's state is a DTensor: the parameter's own placements
(sharding.py) plus Shard(dim) on the ZeRO axes (the dim the piece is cut along,
chosen so no axis shares it), so DCP reshards state saved under any layout,
with or without ZeRO, into any other.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from moray.parallel.dims import Coords, Meshes, ParallelDims
from moray.parallel.grad_reduce import GradReducer, kind_of
from moray.parallel.mixed_precision import adamw_options, adamw_update, new_adamw_state
from moray.parallel.sharding import ParamSpec, local_view, to_dtensor

BUCKET_BYTES = 25 << 20  # DDP's default bucket


class DataParallelOptimizer:
    def __init__(self, named: Dict[str, Tuple[nn.Parameter, ParamSpec]], dims: ParallelDims,
                 meshes: Optional[Meshes], coords: Coords, *, lr: float, betas: Sequence[float], eps: float,
                 weight_decay: float, zero: int, master_weights: bool = False,
                 stage_of: Optional[Dict[str, int]] = None, bucket_bytes: int = BUCKET_BYTES,
                 overlap: bool = True):
        """stage_of: fqn -> the pipeline stage holding it (buckets never span stages); None = one stage.
        meshes may be None when every group has one rank (nothing is exchanged)."""
        self.named, self.dims, self.meshes, self.coords = named, dims, meshes, coords
        self.zero, self.master_weights = zero, master_weights
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        stage_of = stage_of or {fqn: 0 for fqn in named}
        self.reducer = GradReducer(named, stage_of, dims, meshes, coords, zero, bucket_bytes, overlap)
        if meshes is not None:
            self.reducer.make_groups()
        self.fused = bool(adamw_options(next(iter(named.values()))[0].device).get("fused"))
        self.state: Dict[str, Dict[str, torch.Tensor]] = {}
        for fqn in named:
            self.state[fqn] = new_adamw_state(self.reducer.param_piece(fqn), master=master_weights)

    # ------------------------------------------------------------ gradients

    def zero_grad(self) -> None:
        self.reducer.zero_grad()

    def reduce_gradients(self) -> None:
        """Finish the reduction the backward started (grad_reduce.GradReducer.finish)."""
        self.reducer.finish()

    def _first_copy(self, fqn: str) -> bool:
        spec, c = self.named[fqn][1], self.coords
        if self.reducer.piece(fqn) is not None:  # a ZeRO piece is this rank's alone along its axes
            return kind_of(spec, self.dims) != "dense" or spec.tp_dim is not None or c.tp == 0
        if spec.expert:
            return c.edp == 0
        return c.dp == 0 and (spec.tp_dim is not None or c.tp == 0)

    def local_norm_sq(self) -> torch.Tensor:
        """This rank's share of the global squared gradient norm (float64; sum it over the world).
        Each tensor's norm is taken in float32 whatever the gradients' dtype."""
        mine = [self.reducer.grad_piece(fqn) for fqn in self.named if self._first_copy(fqn)]
        mine = [g for g in mine if g is not None and g.numel()]
        if not mine:
            return torch.zeros((), dtype=torch.float64, device=self._device())
        return torch.stack([n.double() for n in torch._foreach_norm(mine, dtype=torch.float32)]).pow(2).sum()

    def scale_gradients(self, factor: float) -> None:
        grads = self.reducer.gradients()
        if grads:
            torch._foreach_mul_(grads, factor)

    # ------------------------------------------------------------ steps

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's pieces, then the parameters from every rank's pieces."""
        for decay in (True, False):
            fqns = [f for f in self.named if (self.named[f][0].dim() >= 2) == decay]
            states = [self.state[f] for f in fqns]
            params = [s["master"] if self.master_weights else self.reducer.param_piece(f)
                      for f, s in zip(fqns, states)]
            adamw_update(params, [self.reducer.grad_piece(f) for f in fqns], states, lr=self.lr, betas=self.betas,
                         eps=self.eps, weight_decay=self.weight_decay if decay else 0.0, fused=self.fused)
        if self.master_weights:  # unsharded pieces are the parameters: round the masters into them
            whole = [f for f in self.named if self.reducer.piece(f) is None]
            if whole:
                torch._foreach_copy_([self.named[f][0].data for f in whole], [self.state[f]["master"] for f in whole])
        self.reducer.gather_params(lambda f: self.state[f]["master"] if self.master_weights
                                   else self.reducer.param_piece(f))

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    # ------------------------------------------------------------ state

    def owned_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """fqn -> AdamW state (and "master" in bf16 runs) of the piece this rank keeps."""
        return self.state

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values())

    def param_piece(self, fqn: str) -> torch.Tensor:
        """This rank's piece of the parameter (a view): what its state describes."""
        return self.reducer.param_piece(fqn)

    def grad_piece(self, fqn: str) -> torch.Tensor:
        """This rank's reduced gradient of its piece (after reduce_gradients)."""
        return self.reducer.grad_piece(fqn)

    def to_dtensor(self, fqn: str, t: torch.Tensor) -> torch.Tensor:
        """A DTensor view of `t`, a piece-shaped tensor (state or gradient) of parameter `fqn`."""
        p, spec = self.named[fqn]
        piece = self.reducer.piece(fqn)
        if piece is None or t.dim() == 0:
            return to_dtensor(t, spec, self.meshes)
        from torch.distributed.tensor import DTensor, Replicate, Shard

        inner = Shard(spec.tp_dim) if spec.tp_dim is not None else Replicate()
        kind = kind_of(spec, self.dims)
        if kind == "expert":
            mesh, placements = self.meshes.expert["edp", "ep", "etp"], (Shard(piece.dim), Shard(0), inner)
        elif kind == "partial":  # split over dp, then each dp share over tp: nested on one dim
            mesh, placements = self.meshes.world["dp", "tp"], (Shard(piece.dim), Shard(piece.dim))
        else:
            mesh, placements = self.meshes.world["dp", "tp"], (Shard(piece.dim), inner)
        stride = torch.empty(spec.global_shape, device="meta").stride()
        return DTensor.from_local(t, mesh, placements, run_check=False, shape=torch.Size(spec.global_shape),
                                  stride=stride)

    def state_view(self, fqn: str, src: torch.Tensor) -> torch.Tensor:
        """This rank's piece of `src`: the whole parameter's shape, this rank's local shard's, or
        already the piece's (returned as it is)."""
        p, spec = self.named[fqn]
        piece_shape = self.reducer.param_piece(fqn).shape
        if src.shape == piece_shape or src.dim() == 0:
            return src
        if tuple(src.shape) == spec.global_shape and spec.global_shape != spec.local_shape:
            src = local_view(src, spec, self.dims, self.coords)
        piece = self.reducer.piece(fqn)
        if piece is not None and tuple(src.shape) == tuple(p.shape):
            b = self.reducer.bucket_of[fqn]
            src = src.narrow(piece.dim, piece.starts[b.rank], piece.lengths[b.rank])
        return src

    def full_grad(self, fqn: str) -> torch.Tensor:
        """The whole model's reduced gradient of `fqn` (collective over the ranks that split it)."""
        g = self.reducer.grad_piece(fqn)
        t = g.detach() if g is not None else torch.zeros_like(self.reducer.param_piece(fqn))
        d = self.to_dtensor(fqn, t)
        return d.full_tensor() if d is not t else t.clone()

    def _device(self) -> torch.device:
        return next(iter(self.named.values()))[0].device

