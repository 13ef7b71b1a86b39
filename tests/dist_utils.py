"""Helpers for the multi-process parallel tests (no tests here).

`spawn(fn, world_size, *args)` runs fn(rank, world_size, *args) in world_size
processes joined by a gloo process group (CPU, one thread each) and returns
each rank's return value. `reference_run` is the single-process baseline that
every layout must match: plain torch, the whole model, AdamW, clipping.

Microbatches and the router's load-balancing loss: each layout's engine
computes that loss per microbatch per dp rank (over that chunk's tokens), so
the baseline runs the global batch as the same contiguous chunks, in order
(dp rank 0's microbatches, then dp rank 1's, ...), each chunk's loss scaled by
1 / chunks. Layouts here keep 2 sequences per microbatch, so one baseline with
4 chunks of 2 serves them all: dp 1 with 4 microbatches, dp 2 with 2.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moray.model import ModelConfig, build_model
from moray.model.moe import set_aux_grad_scale

# configs/tiny.yaml's model: vocab 320, d 128, 4 layers, 4 heads, 1 KV head (MQA), 4 experts top-2.
TINY = dict(vocab_size=320, d_model=128, n_layers=4, n_heads=4, n_kv_heads=1, ffn_hidden=256, mlp="swiglu",
            n_experts=4, top_k=2, max_seq_len=256)
# The parameter check (1e-5 after 3 AdamW steps) must measure the layouts, not float32 noise. Adam
# divides by sqrt(v) + eps, so an element whose gradient nearly cancels turns reduction-order noise
# (~1e-9, different in every layout) into an update difference of up to about lr * noise / eps:
# with lr 3e-3 and eps 1e-8, 8e-5 on tp2 while the gradients agreed to 5e-7 of the largest one.
# Hence eps 1e-6 and lr 1e-3 here (measured: under 3e-6 on every layout). The gradients of step 1
# are compared directly as well, which no Adam rescaling can hide.
OPTIM = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0, eps=1e-6)
SEED = 1234
SEQ_LEN = 16
GLOBAL_BATCH = 8
CHUNKS = 4  # global microbatches of GLOBAL_BATCH // CHUNKS sequences


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def batches(steps: int, global_batch: int = GLOBAL_BATCH, seq_len: int = SEQ_LEN, vocab: int = 320,
            seed: int = 0) -> List[torch.Tensor]:
    """Token batches (global_batch, seq_len + 1), one per step; a repeating pattern plus noise, so
    the loss falls a little in a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        base = torch.randint(0, vocab, (global_batch, 1), generator=g)
        ramp = torch.arange(seq_len + 1).expand(global_batch, -1)
        noise = torch.randint(0, 4, (global_batch, seq_len + 1), generator=g)
        out.append(((base + 3 * ramp + noise) % vocab).long())
    return out


# ---------------------------------------------------------------- baseline


def reference_run(cfg: ModelConfig, data: List[torch.Tensor], chunks: int = CHUNKS, seed: int = SEED,
                  lr: float = OPTIM["lr"], betas=OPTIM["betas"], weight_decay: float = OPTIM["weight_decay"],
                  grad_clip: float = OPTIM["grad_clip"], eps: float = OPTIM["eps"]) -> Dict[str, Any]:
    """Single process: per step, loss/metrics, the (clipped) gradients and the parameters after it."""
    torch.manual_seed(seed)
    model = build_model(cfg, seed=seed)
    set_aux_grad_scale(model, 1.0 / chunks)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps)
    steps, states, grads = [], [], []
    for tokens in data:
        opt.zero_grad(set_to_none=True)
        loss_sum, aux, z, per_expert = 0.0, [], [], torch.zeros(cfg.n_experts, dtype=torch.long)
        for chunk in tokens.tensor_split(chunks):
            x, y = chunk[:, :-1], chunk[:, 1:]
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()) / chunks
            loss.backward()
            loss_sum += loss.item()
            stats = model.moe_aux()
            if stats is not None:
                aux.append(stats.load_balancing_loss.item())
                z.append(stats.z_loss.item())
                per_expert += stats.tokens_per_expert.sum(0)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        steps.append({"loss": loss_sum, "aux_loss": sum(aux) / max(len(aux), 1), "z_loss": sum(z) / max(len(z), 1),
                      "grad_norm": norm.item(), "tokens_per_expert": per_expert.tolist() if cfg.is_moe else []})
        states.append({k: v.detach().clone() for k, v in model.named_parameters()})
        grads.append({k: v.grad.detach().clone() for k, v in model.named_parameters()})
    return {"steps": steps, "params": states, "grads": grads}


def max_param_diff(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:5]
    return max((got[k].float() - want[k].float()).abs().max().item() for k in want)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ---------------------------------------------------------------- processes


def _entry(rank: int, world_size: int, init_file: str, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args) -> List[Any]:
    """fn(rank, world_size, *args) on world_size gloo ranks; their return values, by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "pg_init")
        mp.spawn(_entry, args=(world_size, init_file, tmp, fn, args), nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
