"""MFU of the full pretraining step of moray's TrainEngine against MixtralForCausalLM, one device.

A full step is forward, backward, gradient clipping (global norm 1.0) and AdamW.
Ours is `moray.parallel.TrainEngine.step` in a process group of one (nccl on
CUDA, gloo on CPU), exactly what a training worker runs with train.dtype
bfloat16: bf16 weights, activations and gradients, fp32 master weights and AdamW
state (fused on CUDA). The reference is Hugging Face's MixtralForCausalLM on the
same initial weights (converted in memory), the same tokens, the same AdamW
hyper-parameters (fused on CUDA) and clip_grad_norm_, as its Trainer runs bf16:
float32 weights under bf16 autocast.

    python bench/pretrain_step_gpu.py                                   # CPU: configs/bench-cpu.yaml, float32
    python bench/pretrain_step_gpu.py --config configs/bench-moe.yaml   # GPU: bf16, 8 x 2048 tokens
    python bench/pretrain_step_gpu.py --sequence-parallel               # as gpt4.yaml sets it: a no-op at tp 1

One more engine step, after the timed ones, checks the path it took: every
expert product is torch._grouped_mm on bf16 (never the per-expert loop, which
reads counts on the host), and on CUDA the host syncs of a whole step, counted
with torch.cuda.set_sync_debug_mode("warn"), are fewer than the MoE layers (the
step's one metrics read; at ep > 1 the count exchange adds one per layer). A
failed check exits 1 after the JSON is written.

The models run one after the other, not interleaved as in model_step.py: each
holds 16 bytes per parameter (weights, grads, Adam), both at once would not fit
bench-moe next to its activations, and each model's peak memory must be its own.
FLOPs, peaks and the HF conversion are bench/model_common.py's. The planner's
memory estimate (moray.platform.planner.memory, pydantic-free) is printed beside
the engine's memory_report: issue 5 wants them within 25% on the GPU.
Writes bench/results/pretrain_step_<device>.json (or --out; also $OUT/ when set).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import statistics
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model_common import (ROOT, device_peak_tflops, hf_twin, machine, measure_matmul_tflops,  # noqa: I001
                          model_config, sync, train_flops_per_token)
from model_step import timed
import moray.model.moe as moe
from moray.model import count_params
from moray.parallel import ParallelConfig, ParallelDims, TrainEngine
from moray.platform.planner.memory import estimate_memory  # no pydantic, no yaml: checked with both absent

LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0  # TrainEngine's defaults


def init_single_process_group(device: torch.device) -> None:
    """World size 1 on a free local port: TrainEngine refuses to run without a process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def time_steps(step, device, warmup: int, steps: int):
    """(first step's loss, wall times of the timed steps, CPU times); the peak is reset after warm-up."""
    first = step()
    for _ in range(warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = timed(step, device)
        walls.append(wall)
        cpus.append(cpu)
    return first, walls, cpus


def hf_step_fn(hf, cfg, tokens: torch.Tensor, device: torch.device, bf16: bool):
    """HF's step as its Trainer would do it: one loss (CE + router aux), backward, clip, AdamW."""
    decay = [p for p in hf.parameters() if p.dim() >= 2]  # weight decay on matrices only, as moray's optimizer
    no_decay = [p for p in hf.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS, fused=device.type == "cuda")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = hf(inputs, output_router_logits=True)
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
        (ce + cfg.aux_loss_coef * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), GRAD_CLIP)
        opt.step()
        return ce.item()  # the engine syncs once a step too (its metrics all-reduce)
    return step


def check_grouped_path(engine, tokens: torch.Tensor, device: torch.device) -> dict:
    """One engine step with spies: what reached the expert product, whether torch._grouped_mm ran and
    the per-expert loop did not, and (CUDA) how many host syncs the step made."""
    seen = {"grouped_mm": 0, "loop": 0, "dtypes": set()}
    inner_mm, inner_loop, inner_kernel = moe.grouped_mm, moe._grouped_mm_loop, torch._grouped_mm

    def grouped_mm(x, w, counts):
        seen["dtypes"].add(str(x.dtype))
        return inner_mm(x, w, counts)

    def loop(*args):
        seen["loop"] += 1
        return inner_loop(*args)

    def kernel(*args, **kwargs):
        seen["grouped_mm"] += 1
        return inner_kernel(*args, **kwargs)

    moe.grouped_mm, moe._grouped_mm_loop, torch._grouped_mm = grouped_mm, loop, kernel
    syncs = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            engine.step(tokens)
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                syncs = sum("synchronizing CUDA operation" in str(w.message) for w in caught)
    finally:
        moe.grouped_mm, moe._grouped_mm_loop, torch._grouped_mm = inner_mm, inner_loop, inner_kernel
    n_moe = engine.model_cfg.n_layers if engine.model_cfg.is_moe else 0
    want_dtype = str(engine.compute_dtype)
    # At least the metrics read syncs: none counted means the counter, not the step, is broken.
    ok = (seen["loop"] == 0 and (seen["grouped_mm"] > 0 or n_moe == 0) and seen["dtypes"] <= {want_dtype}
          and (syncs is None or 1 <= syncs < max(n_moe, 2)))
    return {"ok": ok, "grouped_mm_calls": seen["grouped_mm"], "per_expert_loop_calls": seen["loop"],
            "expert_input_dtypes": sorted(seen["dtypes"]), "host_syncs_per_step": syncs, "moe_layers": n_moe}


def row(name, first, walls, cpus, n_tokens, flops, peak, measured_peak, peak_bytes):
    med = statistics.median(walls)
    tflops = flops["total"] * n_tokens / med / 1e12
    return {"model": name, "step_s": med, "step_s_min": min(walls), "step_s_all": walls,
            "cpu_s_median": statistics.median(cpus), "tokens_per_s": n_tokens / med, "tflops": tflops,
            "mfu": tflops / peak, "mfu_vs_measured_matmul": tflops / measured_peak if measured_peak else None,
            "max_memory_allocated": peak_bytes, "first_loss": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="preset (default: bench-moe on CUDA, bench-cpu on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="the engine's train.dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: the preset's micro_batch_size)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's seq_len)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 3 on CUDA, 1 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on CUDA, 3 on CPU)")
    ap.add_argument("--zero", type=int, choices=[0, 1], default=ParallelConfig().zero,
                    help="1: ZeRO-1 optimizer, as training runs it (one rank: no sharding, its wrapper's cost)")
    ap.add_argument("--sequence-parallel", action="store_true",
                    help="parallel.sequence_parallel, as gpt4.yaml trains: at tp 1 (one device) it must change "
                         "nothing, and the JSON records that it was on and had nothing to split")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (Module.compile, in place)")
    ap.add_argument("--no-hf", action="store_true", help="time only the engine")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/pretrain_step_<device>.json)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    bf16 = dtype == "bfloat16"
    args.warmup = max(1, args.warmup or (3 if cuda else 1))  # the first step builds optimizer state (compiles)
    args.steps = args.steps or (10 if cuda else 3)  # keeps the CPU default under a minute on 2 cores
    cfg_path = args.config or str(ROOT / "configs" / ("bench-moe.yaml" if cuda else "bench-cpu.yaml"))
    cfg, train = model_config(cfg_path)
    batch, seq = args.batch or train.get("micro_batch_size", 4), args.seq_len or train.get("seq_len", 256)
    n_tokens = batch * seq
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    init_single_process_group(device)
    par = ParallelConfig(microbatches=1, zero=args.zero, sequence_parallel=args.sequence_parallel)
    engine = TrainEngine(cfg, par, ParallelDims(world_size=1), rank=0, device=device, seed=0, lr=LR, betas=BETAS,
                         weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, dtype=dtype, eps=EPS)
    initial = None if args.no_hf else engine.full_state_dict()  # on the CPU: HF starts from these weights
    if args.compile:
        engine.model_parts[0].compile()  # _forward_backward calls the part itself, so in place is enough
    errors, rows = {}, []
    first, walls, cpus = time_steps(lambda: engine.step(tokens)["loss"], device, args.warmup, args.steps)
    report = engine.memory_report()
    ours_peak = torch.cuda.max_memory_allocated(device) if cuda else report["total_peak"]
    # Named from outside: the optimizer's insides (ZeRO pieces, master copies) are the engine's business.
    optimizer_kind = f"{type(engine.optimizer).__name__}(zero={args.zero}, fp32 master={bf16})"
    sequence_parallel_active = engine.sequence_parallel  # False at tp 1 whatever the flag: nothing to split
    # A compiled model does not call the Python functions the check spies on.
    path = {"ok": True, "skipped": "--compile"} if args.compile else check_grouped_path(engine, tokens, device)
    print(f"{'PASS' if path['ok'] else 'FAIL'}  engine path: {json.dumps(path)}", flush=True)
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    peak, peak_source = device_peak_tflops(device, torch.bfloat16 if bf16 else torch.float32, args.peak_tflops)
    # A large bf16 matmul shows what this chip really sustains (H200: ~784 of 989); on the CPU the peak
    # above is already measured.
    measured = measure_matmul_tflops(device, torch.bfloat16, n=8192) if cuda else None
    flops = train_flops_per_token(cfg, seq)
    rows.append(row("moray TrainEngine", first, walls, cpus, n_tokens, flops, peak, measured, ours_peak))

    if not args.no_hf:
        try:
            hf = hf_twin(cfg, initial, device, torch.float32).train()
            del initial
            if args.compile:
                hf.compile()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            step = hf_step_fn(hf, cfg, tokens, device, bf16)
            first, walls, cpus = time_steps(step, device, args.warmup, args.steps)
            hf_peak = torch.cuda.max_memory_allocated(device) if cuda else None  # no CPU allocator stats
            rows.append(row("HF Mixtral", first, walls, cpus, n_tokens, flops, peak, measured, hf_peak))
        except Exception as err:  # noqa: BLE001 - keep our result when the reference cannot run
            errors["HF Mixtral"] = f"{type(err).__name__}: {err}"
            print(f"HF Mixtral failed, not timed: {errors['HF Mixtral'][:500]}")
    base = next((r for r in rows if r["model"] == "HF Mixtral"), None)
    for r in rows:
        r["speedup_vs_hf"] = base["step_s"] / r["step_s"] if base else None  # > 1: faster than HF
        r["mfu_over_hf"] = r["mfu"] / base["mfu"] if base else None  # the same FLOPs: the speedup again
        r["memory_vs_hf"] = (r["max_memory_allocated"] / base["max_memory_allocated"]
                             if base and base["max_memory_allocated"] else None)

    plan = estimate_memory(cfg, par, micro_batch_size=batch, seq_len=seq, dtype=dtype, dp=1)
    memory = {"engine_report": report, "measured_peak": ours_peak, "planned": plan.to_dict(),
              "measured_over_planned": ours_peak / plan.total_bytes}

    n = count_params(cfg)
    result = {
        "benchmark": "pretrain_step", "machine": machine(device), "config": Path(cfg_path).name,
        "model": cfg.to_dict(), "params_total": n.total, "params_active": n.active, "dtype": dtype,
        "hf_autocast_bf16": bf16, "batch": batch, "seq_len": seq, "warmup": args.warmup, "steps": args.steps,
        "parallel": par.to_dict(), "sequence_parallel_active": sequence_parallel_active,
        "compile": args.compile, "engine_optimizer": optimizer_kind,
        "hf_optimizer": f"torch.optim.AdamW(fused={cuda})", "engine_path": path,
        "hyper": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP},
        "peak_tflops": peak, "peak_source": peak_source, "measured_matmul_tflops": measured,
        "flops_per_token": flops,
        "flops_formula": "6 * params_active + 12 * n_layers * n_heads * head_dim * seq_len (PaLM model FLOPs)",
        "results": rows, "memory": memory, "errors": errors}
    outs = [Path(args.out) if args.out else ROOT / "bench" / "results" / f"pretrain_step_{device.type}.json"]
    if not args.out and os.environ.get("OUT"):  # the device tool brings back what lands in $OUT
        outs.append(Path(os.environ["OUT"]) / outs[0].name)
    for out in dict.fromkeys(p.resolve() for p in outs):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    dist.destroy_process_group()

    gib = 2**30
    print(f"\npretrain_step: {Path(cfg_path).name}, {n.total / 1e6:.1f}M params ({n.active / 1e6:.1f}M active), "
          f"batch {batch} x {seq} tokens, engine {dtype}{' (HF: autocast)' if bf16 else ''}, zero={args.zero}, "
          f"sequence_parallel={args.sequence_parallel} (active: {sequence_parallel_active}), "
          f"{'compiled, ' if args.compile else ''}{device} ({machine(device).get('gpu', 'cpu')})")
    print(f"peak {peak:.3f} TFLOP/s ({peak_source})"
          + (f"; measured bf16 matmul {measured:.0f} TFLOP/s" if measured else "")
          + f"; FLOPs/token {flops['total'] / 1e6:.1f}M; optimizers: ours {optimizer_kind}, HF {result['hf_optimizer']}")
    r = report
    print(f"memory, ours: params {r['params'] / gib:.2f} + grads {r['grads'] / gib:.2f} + optimizer "
          f"{r['optimizer'] / gib:.2f} + activations {r['activations_peak'] / gib:.2f} = {ours_peak / gib:.2f} GiB; "
          f"planned {plan.total_bytes / gib:.2f} GiB (activations {plan.activations_bytes / gib:.2f}); "
          f"measured/planned {memory['measured_over_planned']:.2f}\n")
    print(f"{'model':<19}{'step ms':>10}{'best ms':>10}{'tokens/s':>11}{'TFLOP/s':>10}{'MFU':>8}{'MFU/meas':>9}"
          f"{'peak GiB':>10}{'vs HF':>8}{'mem/HF':>8}{'CPU s':>8}{'CE@1':>9}")
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['model']:<19}{r['step_s'] * 1e3:>10.1f}{r['step_s_min'] * 1e3:>10.1f}{r['tokens_per_s']:>11.0f}"
              f"{r['tflops']:>10.3f}{r['mfu'] * 100:>7.1f}%{fmt(r['mfu_vs_measured_matmul'] and 100 * r['mfu_vs_measured_matmul'], '.1f'):>9}"
              f"{fmt(r['max_memory_allocated'] and r['max_memory_allocated'] / gib, '.2f'):>10}"
              f"{fmt(r['speedup_vs_hf'], '.2f') + 'x':>8}{fmt(r['memory_vs_hf'], '.2f'):>8}"
              f"{r['cpu_s_median']:>8.2f}{r['first_loss']:>9.4f}")
    print("vs HF: HF's median step time over this one (> 1: faster than HF; also our MFU over HF's); "
          "mem/HF: peak memory over HF's; CPU s: process CPU seconds, steadier than wall time on a shared CPU")
    raise SystemExit(0 if path["ok"] else 1)


if __name__ == "__main__":
    main()
