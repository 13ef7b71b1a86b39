"""Decode on one GPU: the engine with CUDA graphs, without them, and Hugging Face `generate`.

Issue 10's device line, in one run on configs/bench-moe.yaml (bf16):
  - batch 1 against the memory-bandwidth bound: the bytes a decode step must read (the weights
    it touches, with the distinct experts per layer as the engine measured them, and the KV
    cache of the context) over the bandwidth a device copy reaches in this run;
  - batch 1 / 16 / 64 tokens/s: ours (CUDA graphs), ours (planned path, no graphs), HF generate,
    and the ratios; 128 prompt + 128 new tokens, greedy, prefill included as HF's figure has it;
  - correctness: greedy tokens with graphs equal those without (same logits up to the padded
    product's rounding: the agreement is reported, the logits of one step compared).

Imports only torch, transformers and moray.model / moray.serve.engine (no Ray, no pydantic):
the GPU machine has neither.

    python bench/serve_decode_gpu.py --device cuda                         # bench-moe, the H200
    python bench/serve_decode_gpu.py --device cpu --config configs/tiny.yaml --smoke   # plumbing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_common import ROOT, hf_twin, machine, model_config, sync  # noqa: E402

from moray.model import build_model  # noqa: E402
from moray.model.moe import MoE  # noqa: E402
from moray.serve.engine.config import EngineConfig  # noqa: E402
from moray.serve.engine.core import EngineCore  # noqa: E402
from moray.serve.engine.llm import LLM  # noqa: E402
from moray.serve.engine.sampling import SamplingParams  # noqa: E402


def copy_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Bytes/s a device-to-device copy moves (read + write), best of a few."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 2 / best


def decode_bytes(model, experts_touched, context: int, kv_bytes_per_token: int) -> int:
    """What one batch-1 decode step reads: every weight but the unused experts and the embedding
    table (one row), plus the KV cache of `context` tokens."""
    total = 0
    moe_layers = [layer.feed_forward for layer in model.layers.values() if isinstance(layer.feed_forward, MoE)]
    for name, p in model.named_parameters():
        if name.startswith("tok_embeddings") and not (model.cfg.tie_embeddings and model.output is not None):
            total += p[0].numel() * p.element_size()
        elif ".experts." not in name:
            total += p.numel() * p.element_size()
    for ff, touched in zip(moe_layers, experts_touched):
        for w in (ff.experts.w1, ff.experts.w2, ff.experts.w3):
            if w is not None:
                total += touched * w[0].numel() * w.element_size()
    return total + context * kv_bytes_per_token


def run_engine(core: EngineCore, prompts, new_tokens: int, device) -> dict:
    llm = LLM.from_core(core)
    p = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, p)  # warm-up at the same shapes: every graph this run needs is captured here
    sync(device)
    t = time.perf_counter()
    outs = llm.generate(prompts, p)
    sync(device)
    wall = time.perf_counter() - t
    # decode-only steps: a fresh batch, prefilled, then steps timed one by one
    for i, pr in enumerate(prompts):
        core.add_request(f"d{i}", pr, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    core.step()  # the prefill
    times, touched = [], []
    for _ in range(32):
        t0 = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t0)
        touched.append(core.stats.last_experts_touched)
    for i in range(len(prompts)):
        core.abort_request(f"d{i}")
    return {"tokens_per_s": len(prompts) * new_tokens / wall, "seconds": wall,
            "decode_step_ms_median": 1e3 * statistics.median(times),
            "experts_touched_per_layer": [statistics.mean(t[i] for t in touched) for i in range(len(touched[0]))]
            if touched and touched[0] else [],
            "token_ids": [o.outputs[0].token_ids for o in outs]}


@torch.inference_mode()
def run_hf(hf, prompts, new_tokens: int, device) -> dict:
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=0, eos_token_id=None)
    hf.generate(ids[:, :8], **{**kw, "attention_mask": mask[:, :8], "max_new_tokens": 4, "min_new_tokens": 4})
    sync(device)
    t = time.perf_counter()
    out = hf.generate(ids, **kw)
    sync(device)
    wall = time.perf_counter() - t
    return {"tokens_per_s": len(prompts) * new_tokens / wall, "seconds": wall,
            "token_ids": out[:, ids.shape[1]:].tolist()}


def agreement(a, b) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="configs/bench-moe.yaml")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing: 16 + 8 tokens, graphs in 'static' mode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.smoke:
        args.prompt_len, args.new_tokens = 16, 8
    batches = [int(b) for b in args.batches.split(",")]
    cfg, _ = model_config(ROOT / args.config)
    torch.manual_seed(0)
    model = build_model(cfg, seed=0, device=device, dtype=torch.bfloat16).eval()
    graphs_mode = "cuda" if device.type == "cuda" else "static"
    engine_kw = dict(dtype="bfloat16", device=str(device), max_num_seqs=max(batches), kv_block_size=16,
                     kv_cache_memory_mb=2048.0 if device.type == "cuda" else 64.0, max_batch_tokens=8192)
    cores = {"graphs": EngineCore(model, cfg, EngineConfig(**engine_kw, decode_graphs=graphs_mode)),
             "eager": EngineCore(model, cfg, EngineConfig(**engine_kw, decode_graphs="off"))}
    hf = None if args.no_hf else hf_twin(cfg, model.state_dict(), device, torch.bfloat16).eval()
    bw = copy_bandwidth(device, 1.0 if device.type == "cuda" else 0.125)
    results = {"config": args.config, "device": machine(device), "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "graphs_mode": graphs_mode, "copy_bandwidth_gb_s": bw / 1e9,
               "batches": {}}
    g = torch.Generator().manual_seed(1)
    print(f"{args.config}: copy bandwidth {bw / 1e9:.0f} GB/s; graphs mode {graphs_mode}")
    print(f"{'batch':>5} {'graphs tok/s':>13} {'eager tok/s':>12} {'HF tok/s':>9} {'graphs/HF':>10} "
          f"{'step ms g/e':>12} {'agree':>6}")
    for b in batches:
        prompts = torch.randint(0, cfg.vocab_size, (b, args.prompt_len), generator=g).tolist()
        row = {name: run_engine(core, prompts, args.new_tokens, device) for name, core in cores.items()}
        if hf is not None:
            row["hf"] = run_hf(hf, prompts, args.new_tokens, device)
            row["graphs_over_hf"] = row["graphs"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
        row["graphs_over_eager"] = row["graphs"]["tokens_per_s"] / row["eager"]["tokens_per_s"]
        row["graphs_agree_eager"] = agreement(row["graphs"]["token_ids"], row["eager"]["token_ids"])
        if b == 1:
            ex = cores["graphs"].executor
            touched = row["graphs"]["experts_touched_per_layer"]
            ctx = args.prompt_len + args.new_tokens // 2  # the mean context over the decode
            need = decode_bytes(model, touched, ctx, ex.kv_bytes_per_token)
            bound = bw / need
            step_s = row["graphs"]["decode_step_ms_median"] / 1e3
            row["bandwidth_bound"] = {"bytes_per_step": need, "bound_tokens_per_s": bound,
                                      "decode_tokens_per_s": 1 / step_s, "fraction_of_bound": (1 / step_s) / bound}
        gr = cores["graphs"].executor.decode_graphs
        row["graph_replays"] = gr.replays if gr is not None else 0
        hf_tps = f"{row['hf']['tokens_per_s']:9.0f}" if "hf" in row else f"{'-':>9}"
        ratio = f"{row['graphs_over_hf']:10.2f}" if "graphs_over_hf" in row else f"{'-':>10}"
        print(f"{b:>5} {row['graphs']['tokens_per_s']:13.0f} {row['eager']['tokens_per_s']:12.0f} {hf_tps} {ratio} "
              f"{row['graphs']['decode_step_ms_median']:5.2f}/{row['eager']['decode_step_ms_median']:<5.2f} "
              f"{row['graphs_agree_eager']:6.0%}", flush=True)
        for name in ("graphs", "eager", "hf"):
            if name in row:
                row[name].pop("token_ids")
        results["batches"][str(b)] = row
    if "1" in results["batches"]:
        bb = results["batches"]["1"]["bandwidth_bound"]
        print(f"batch 1 decode: {bb['decode_tokens_per_s']:.0f} tok/s against a bound of {bb['bound_tokens_per_s']:.0f} "
              f"({bb['bytes_per_step'] / 1e9:.2f} GB per step): {bb['fraction_of_bound']:.0%} of the bound")
    gr = cores["graphs"].executor.decode_graphs
    results["graph_captures"] = gr.captures if gr is not None else 0
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"serve_decode_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    banned = [m for m in ("ray", "pydantic", "fastapi") if m in sys.modules]
    if banned:
        raise SystemExit(f"imported {banned}: the GPU machine has none of them")


if __name__ == "__main__":
    main()
