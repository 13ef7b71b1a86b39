"""Data throughput: preparing the demo corpus, sampling batches, and sampling against a model step.

Preparation is timed on the demo corpus (standard-library code and prose, byte
tokenizer) with the plain loop and on Ray Data (embedded 2-CPU cluster; the
cluster's start is reported apart). Sampling is timed per batch on rank 0 of
1 and 4 data-parallel ranks, at the prepared seq_len and at 4x (context
extension, re-chunked), starting from a cold shard cache. The last column is
mean sampling time per batch (cold shard loads included) over the fastest
training step of configs/tiny.yaml's model (forward, backward, AdamW) on the
same batch: it must stay far below 1.

    python bench/data_throughput.py [--steps 200] [--no-ray] [--dir DIR]

Prints a table and writes bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moray.data import MixtureSampler, prepare  # noqa: E402
from moray.data.demo_corpus import build_demo_corpus  # noqa: E402
from moray.platform.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "data_throughput.json"


def quiet(*_args) -> None:
    pass


def time_prepare(data, seq_len, map_fn=None) -> dict:
    began = time.perf_counter()
    result = prepare(data, seq_len, map_fn=map_fn, log=quiet)
    seconds = time.perf_counter() - began
    tokens = sum(s.tokens for s in result.manifest.sources)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "shards_written": len(result.written), "manifest": result.manifest}


def model_step_seconds(cfg, batch, seq_len, steps: int = 8) -> tuple:
    """Fastest of `steps` training steps of the config's model (moray.model, else a stand-in):
    the fastest, so that a machine shared with other work makes the ratio worse, not better."""
    try:
        from moray.model import build_model

        model, name = build_model(cfg.model, seed=0), "moray.model tiny MoE"
    except Exception as err:  # the model room may be mid-change: a dense stand-in of the same width
        print(f"(moray.model unavailable: {err}; using a torch TransformerEncoder stand-in)")
        m = cfg.model
        layer = torch.nn.TransformerEncoderLayer(m.d_model, m.n_heads, m.ffn_hidden, batch_first=True)
        body = torch.nn.TransformerEncoder(layer, m.n_layers)
        emb, head = torch.nn.Embedding(m.vocab_size, m.d_model), torch.nn.Linear(m.d_model, m.vocab_size)
        model, name = torch.nn.Sequential(emb, body, head), "torch stand-in"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (batch, seq_len + 1))
    times = []
    for i in range(steps + 2):
        began = time.perf_counter()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # the first steps allocate
            times.append(time.perf_counter() - began)
    return min(times), name


def time_sampling(manifest, seed, dp_size, batch, seq_len, steps) -> dict:
    sampler = MixtureSampler(manifest, seed=seed, dp_rank=0, dp_size=dp_size, seq_len=seq_len)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        sampler.next_batch(batch)
        times.append(time.perf_counter() - began)
    total = sum(times)
    return {"dp_size": dp_size, "batch": batch, "seq_len": seq_len, "steps": steps,
            "batch_ms_mean": total / steps * 1e3, "batch_ms_median": statistics.median(times) * 1e3,
            "batch_ms_max": max(times) * 1e3, "tokens_per_s": batch * seq_len * steps / total,
            "shard_loads": sampler.shard_loads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="batches per sampling row")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray Data preparation row")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    seq_len, micro = cfg.train.seq_len, cfg.train.micro_batch_size
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="moray-data-bench-"))
    try:
        began = time.perf_counter()
        sources = build_demo_corpus(str(base / "sources"), log=quiet)
        corpus_s = time.perf_counter() - began
        data = replace(cfg.data, dir=str(base / "local"), sources=sources)
        prep = [dict(mode="plain loop", **time_prepare(data, seq_len))]
        prep.append(dict(mode="rerun (no-op)", **time_prepare(data, seq_len)))
        if not args.no_ray:
            from moray.data.ray_prepare import connect, ray_map
            import ray

            began = time.perf_counter()
            connect(num_cpus=2)
            start_s = time.perf_counter() - began
            prep.append(dict(mode="Ray Data", cluster_start_s=start_s,
                             **time_prepare(replace(data, dir=str(base / "ray")), seq_len, ray_map)))
            ray.shutdown()
        manifest = prep[0].pop("manifest")
        for p in prep[1:]:
            p.pop("manifest")

        step_s, model_name = model_step_seconds(cfg, micro, seq_len)
        rows = []
        for dp_size, batch, L in ((1, micro, seq_len), (4, micro, seq_len), (1, 64, seq_len), (1, micro, 4 * seq_len)):
            r = time_sampling(manifest, cfg.train.seed, dp_size, batch, L, args.steps)
            r["vs_tiny_step"] = r["batch_ms_mean"] / 1e3 / step_s if (batch, L) == (micro, seq_len) else None
            rows.append(r)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)

    tokens = prep[0]["tokens"]
    print(f"demo corpus: {tokens:,} tokens ({corpus_s:.1f} s to write its sources); tiny model step "
          f"({model_name}, batch {micro}x{seq_len}): {step_s * 1e3:.1f} ms")
    print(f"\n{'preparation':<16}{'seconds':>9}{'tokens/s':>14}{'shards':>8}")
    for p in prep:
        extra = f"   (+{p['cluster_start_s']:.1f} s cluster start)" if "cluster_start_s" in p else ""
        rate = f"{p['tokens_per_s']:,.0f}" if p["shards_written"] else "-"
        print(f"{p['mode']:<16}{p['seconds']:>9.2f}{rate:>14}{p['shards_written']:>8}{extra}")
    print(f"\n{'sampling':<10}{'dp':>4}{'batch':>7}{'seq':>6}{'ms/batch':>10}{'max ms':>8}{'tokens/s':>13}{'loads':>7}"
          f"{'vs step':>9}")
    for r in rows:
        ratio = f"{r['vs_tiny_step']:.4f}" if r["vs_tiny_step"] is not None else "-"
        print(f"{'rank 0':<10}{r['dp_size']:>4}{r['batch']:>7}{r['seq_len']:>6}{r['batch_ms_mean']:>10.3f}"
              f"{r['batch_ms_max']:>8.1f}{r['tokens_per_s']:>13,.0f}{r['shard_loads']:>7}{ratio:>9}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "data_throughput",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "corpus_tokens": tokens, "corpus_build_s": corpus_s,
        "tiny_step_s": step_s, "tiny_model": model_name, "micro_batch": micro, "seq_len": seq_len,
        "preparation": prep, "sampling": rows,
    }, indent=1) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
