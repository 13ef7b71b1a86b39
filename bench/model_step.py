"""A training step (forward + backward) of moray's model against MixtralForCausalLM, side by side.

Both models hold the same weights (ours converted to Hugging Face's layout in
memory) and see the same tokens; the loss is the same next-token cross-entropy
plus each model's load-balancing loss. Steps alternate ours / HF so machine
noise hits both alike; each time is one synchronised step, and the table shows
the median after warm-up.

    python bench/model_step.py                                   # CPU, configs/bench-cpu.yaml, float32
    python bench/model_step.py --config configs/bench-moe.yaml   # GPU, bf16, 8 x 2048 tokens
    python bench/model_step.py --compile                         # also torch.compile'd ours

TFLOP/s use PaLM's model FLOPs per token, 6 * N_active + 12 * L * H * Q * T
(bench/model_common.py: train_flops_per_token); MFU divides by --peak-tflops
(default: the bf16 dense datasheet peak on CUDA, 989 for H100/H200; on CPU a
matmul peak measured in-process). Writes bench/results/model_step_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model_common import (ROOT, device_peak_tflops, hf_twin, machine, model_config, sync,  # noqa: I001
                          train_flops_per_token)
from moray.model import build_model, count_params


def step_fn(model, is_hf: bool, tokens: torch.Tensor, targets: torch.Tensor, aux_coef: float):
    def step() -> float:
        if is_hf:
            out = model(tokens, output_router_logits=True)
            logits, extra = out.logits, aux_coef * out.aux_loss
        else:  # moray's router losses put their gradient in place inside each MoE layer
            logits, extra = model(tokens), 0.0
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        (ce + extra).backward()
        for p in model.parameters():
            p.grad = None
        return ce.item()
    return step


def timed(step, device) -> tuple:
    """(wall seconds, this process's CPU seconds): on a shared CPU the second is the steadier."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="preset (default: bench-moe on CUDA, bench-cpu on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: the preset's micro_batch_size)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the preset's seq_len)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    ap.add_argument("--no-hf", action="store_true", help="time only ours")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 steadies a shared CPU)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/model_step_<device>.json)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg_path = args.config or str(ROOT / "configs" / ("bench-moe.yaml" if device.type == "cuda" else "bench-cpu.yaml"))
    cfg, train = model_config(cfg_path)
    batch, seq = args.batch or train.get("micro_batch_size", 4), args.seq or train.get("seq_len", 256)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    ours = build_model(cfg, seed=0, device=device, dtype=dtype).train()
    runs = {"moray": step_fn(ours, False, inputs, targets, 0.0)}
    if args.compile:
        runs["moray+compile"] = step_fn(torch.compile(ours), False, inputs, targets, 0.0)
    if not args.no_hf:
        hf = hf_twin(cfg, ours.state_dict(), device, dtype).train()
        runs["transformers"] = step_fn(hf, True, inputs, targets, cfg.aux_loss_coef)
    first_loss, errors = {}, {}
    for name, step in list(runs.items()):  # also the first warm-up step (compiles, if asked)
        try:
            first_loss[name] = step()
        except Exception as err:  # noqa: BLE001 - report a failed variant, time the others
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"{name} failed, not timed: {errors[name][:500]}")
            del runs[name]
    for _ in range(args.warmup - 1):
        for step in runs.values():
            step()
    times = {name: [] for name in runs}
    cpu_times = {name: [] for name in runs}
    for _ in range(args.steps):
        for name, step in runs.items():
            wall, cpu = timed(step, device)
            times[name].append(wall)
            cpu_times[name].append(cpu)

    peak, peak_source = device_peak_tflops(device, dtype, args.peak_tflops)
    flops = train_flops_per_token(cfg, seq)
    n_tokens = batch * seq
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        tflops = flops["total"] * n_tokens / med / 1e12
        rows.append({"model": name, "step_s": med, "step_s_min": min(ts), "step_s_all": ts,
                     "cpu_s_median": statistics.median(cpu_times[name]), "tokens_per_s": n_tokens / med,
                     "tflops": tflops, "mfu": tflops / peak, "first_loss": first_loss[name]})
    base = next((r for r in rows if r["model"] == "transformers"), None)
    for r in rows:
        r["speedup_vs_transformers"] = base["step_s"] / r["step_s"] if base else None

    n = count_params(cfg)
    print(f"\nmodel_step: {Path(cfg_path).name}, {n.total / 1e6:.1f}M params ({n.active / 1e6:.1f}M active), "
          f"batch {batch} x {seq} tokens, {dtype}, {device} ({machine(device).get('gpu', 'cpu')})")
    print(f"peak {peak:.3f} TFLOP/s ({peak_source}); FLOPs/token {flops['total'] / 1e6:.1f}M "
          f"(6N {flops['params_term'] / 1e6:.1f}M + attention {flops['attention_term'] / 1e6:.1f}M)\n")
    print(f"{'model':<16}{'step ms':>10}{'best ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'vs HF':>8}{'CPU s':>8}{'CE@1':>9}")
    for r in rows:
        ratio = f"{r['speedup_vs_transformers']:.2f}x" if r["speedup_vs_transformers"] else "-"
        print(f"{r['model']:<16}{r['step_s'] * 1e3:>10.1f}{r['step_s_min'] * 1e3:>10.1f}{r['tokens_per_s']:>12.0f}{r['tflops']:>10.3f}"
              f"{r['mfu'] * 100:>7.1f}%{ratio:>8}{r['cpu_s_median']:>8.2f}{r['first_loss']:>9.4f}")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB (both models)")

    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"model_step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "model_step", "machine": machine(device), "config": Path(cfg_path).name,
        "model": cfg.to_dict(), "params_total": n.total, "params_active": n.active, "dtype": str(dtype),
        "batch": batch, "seq_len": seq, "warmup": args.warmup, "steps": args.steps,
        "peak_tflops": peak, "peak_source": peak_source, "flops_per_token": flops,
        "flops_formula": "6 * params_active + 12 * n_layers * n_heads * head_dim * seq_len (PaLM model FLOPs)",
        "results": rows, "errors": errors}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
