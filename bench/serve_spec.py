"""Speculative decoding with a TRAINED target and a TRAINED smaller draft, on this CPU (issue 10).

One run, in one process:

  1. data: the demo corpus's code (the standard library's .py files, in
     moray.data.demo_corpus's fixed order) as bytes, the byte tokenizer's ids; the first
     3 MB of files train (as the demo corpus takes them), the next ones are held out for prompts;
  2. training, plain torch (AdamW, cosine schedule, fixed seeds, float32, --threads torch
     threads): a Mixtral-style target (d 256, 4 layers, 4 heads / 1 KV head, 8 experts
     top-2) and two much smaller dense drafts with the same vocabulary, all on the same
     batches in one loop; each draft learns the data and, increasingly, the target's own
     next-token distribution (online distillation: the target's logits of the step are
     there anyway). The weights are cached under bench/.cache/serve_spec/ (keyed by
     everything that shapes them), so a rerun skips training (--retrain forces it);
  3. measurements at batch 1 and 4, greedy and temperature 0.8 (seeded per request):
     plain decoding against speculative decoding with each draft at k in --ks (at batch > 1 the
     draft fastest at batch 1, unless --batch4-drafts says otherwise), through
     EngineCore with an in-memory draft. Output tokens/s (prompt and prefill included, as
     bench/serve_engine.py counts them), the speed-up over plain decoding at the same batch
     and temperature, acceptance rate, mean accepted length; greedy speculative output
     must equal plain greedy token for token (checked, recorded, and the run fails after
     writing its results if it does not). Every configuration has its own engine (no
     prefix-cache hits across configurations); they run the same batch in lockstep, one
     engine step each in turn, so load from other work on a shared CPU, which comes in
     bursts, falls on all of them alike; a configuration's time is the sum of its own
     steps (wall_s), and the median decode step gives a second, burst-proof figure
     (decode.tokens_per_s_median, decode_speedup_median). N-gram drafting runs on a
     repetitive workload (prompts that repeat a piece of code) for reference;
  4. where the time goes: per decode step, the draft model's forwards, the target's
     forward (a plain decode, or a verification of k + 1 tokens) and the rest (the
     engine's host work: scheduling, sampling, the rejection rule), each engine's model
     calls timed as they run; and the forward time of each model by tokens in the pass,
     which is what prices a verification of k + 1 tokens against a decode of one.

    python bench/serve_spec.py                  # train (cached) + measure: ~10 min training, ~8 min measuring
    python bench/serve_spec.py --retrain        # train again even if bench/.cache holds the weights
    python bench/serve_spec.py --smoke          # tiny models, a few steps: the plumbing in seconds
    python bench/serve_spec.py --dtype bfloat16 # serve in bf16 (this CPU has no native bf16: slow)

Writes bench/results/serve_spec.json (--smoke: serve_spec_smoke.json; --out overrides); the
table is printed last. --threads defaults to 1: on a CPU shared with other work a 2-thread op
waits for a descheduled thread (measured here: a training step 20x slower at 2 threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_common import ROOT, machine  # noqa: E402  (puts the repo on sys.path)
import serve_common as sc  # noqa: E402
from serve_spec_train import (CACHE, _windows, code_prompts, load_code, repetitive_prompts,  # noqa: E402
                              train_models)

from moray.model import ModelConfig  # noqa: E402
from moray.serve.engine.config import EngineConfig  # noqa: E402
from moray.serve.engine.core import EngineCore  # noqa: E402
from moray.serve.engine.executor import ModelExecutor, SeqChunk  # noqa: E402
from moray.serve.engine.sampling import SamplingParams  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

_TARGET = dict(vocab_size=320, d_model=256, n_layers=4, n_heads=4, n_kv_heads=1, head_dim=64, ffn_hidden=512,
               n_experts=8, top_k=2, max_seq_len=256)
PRESETS = {
    "default": dict(
        target=_TARGET,
        drafts={
            # ~1/10 of the target's decode step on this CPU, 1/50 of its parameters
            "d96x2": dict(vocab_size=320, d_model=96, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=48,
                          ffn_hidden=256, max_seq_len=256),
            # the smallest: one layer
            "d64x1": dict(vocab_size=320, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32,
                          ffn_hidden=192, max_seq_len=256),
        },
        train=dict(steps=600, batch_size=4, seq_len=256, lr=2e-3, min_lr=2e-4, draft_lr=3e-3, distill=1.0,
                   warmup=30, weight_decay=0.1, log_every=50, eval_windows=32),
        train_bytes=3_000_000, prompt_len=96, new_tokens=128, num_prompts=8, ks=[2, 3, 4, 5], batches=[1, 4]),
    "smoke": dict(
        target=dict(vocab_size=320, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, ffn_hidden=64,
                    n_experts=4, top_k=2, max_seq_len=128),
        drafts={"d32x1": dict(vocab_size=320, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                              ffn_hidden=64, max_seq_len=128)},
        train=dict(steps=6, batch_size=2, seq_len=64, lr=3e-3, min_lr=3e-4, draft_lr=3e-3, distill=1.0, warmup=2,
                   weight_decay=0.1, log_every=3, eval_windows=4),
        train_bytes=200_000, prompt_len=24, new_tokens=12, num_prompts=2, ks=[2], batches=[1, 2]),
}


class Timed:
    """Wraps an executor's execute: the seconds and calls of its forwards."""

    def __init__(self, executor):
        self.executor, self.inner = executor, executor.execute
        self.seconds, self.calls = 0.0, 0
        executor.execute = self

    def __call__(self, chunks: List[SeqChunk]):
        t = time.perf_counter()
        res = self.inner(chunks)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return res


class Runner:
    """One engine configuration: its EngineCore, the timers on its model calls, what it produced."""

    def __init__(self, label: str, target, cfg: ModelConfig, engine: EngineConfig, draft=None, meta=None):
        self.label, self.meta = label, dict(meta or {})
        self.core = EngineCore(target, cfg, engine, None, draft_model=draft,
                               draft_model_cfg=draft.cfg if draft is not None else None)
        self.target_t = Timed(self.core.executor)
        drafter_ex = getattr(self.core.drafter, "executor", None)
        self.draft_t = Timed(drafter_ex) if drafter_ex is not None else None
        self.ids = 0
        self.reset()

    def reset(self) -> None:
        self.wall = 0.0
        self.tokens = 0
        self.outputs: Dict[int, List[int]] = {}
        self._ids: Dict[str, int] = {}
        self.decode = {"steps": 0, "wall": 0.0, "target": 0.0, "draft": 0.0, "target_calls": 0, "draft_calls": 0,
                       "experts": 0.0, "step_s": []}
        self.prefill = {"steps": 0, "wall": 0.0}
        self.spec0 = self.core.stats.spec.to_dict()

    def start(self, prompts: Dict[int, List[int]], params: Dict[int, SamplingParams]) -> None:
        """Add a batch of requests (all at once); step() then runs them."""
        t = time.perf_counter()
        for i, p in prompts.items():
            rid = f"{self.ids}"
            self.ids += 1
            self._ids[rid] = i
            self.core.add_request(rid, p, params[i])
        self.wall += time.perf_counter() - t

    @property
    def busy(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> None:
        """One engine step, timed, split into the draft's forwards, the target's and the rest."""
        core = self.core
        prefilling = any(r.num_tokens - r.num_computed_tokens > 1 for r in core.scheduler.running) or bool(
            core.scheduler.waiting)
        d0 = self.draft_t.seconds if self.draft_t else 0.0
        dc = self.draft_t.calls if self.draft_t else 0
        t0, c0 = self.target_t.seconds, self.target_t.calls
        t = time.perf_counter()
        outs = core.step()
        dt = time.perf_counter() - t
        self.wall += dt
        if prefilling:
            self.prefill["steps"] += 1
            self.prefill["wall"] += dt
        else:
            d = self.decode
            d["steps"] += 1
            d["wall"] += dt
            d["step_s"].append(dt)
            d["target"] += self.target_t.seconds - t0
            d["target_calls"] += self.target_t.calls - c0
            et = core.stats.last_experts_touched
            if et:
                d["experts"] += sum(et) / len(et)
            if self.draft_t:
                d["draft"] += self.draft_t.seconds - d0
                d["draft_calls"] += self.draft_t.calls - dc
        for o in outs:
            if o.finished:
                i = self._ids[o.request_id]
                self.outputs[i] = list(o.outputs[0].token_ids)
                self.tokens += len(self.outputs[i])

    def run(self, prompts: Dict[int, List[int]], params: Dict[int, SamplingParams]) -> None:
        """Generate every prompt (one batch: all added at once) to the end."""
        self.start(prompts, params)
        while self.busy:
            self.step()

    def summary(self) -> dict:
        s1 = self.core.stats.spec.to_dict()
        spec = {k: s1[k] - self.spec0[k] for k in ("drafted", "accepted", "emitted", "steps")}
        spec["acceptance_rate"] = spec["accepted"] / spec["drafted"] if spec["drafted"] else 0.0
        spec["mean_accepted_length"] = spec["accepted"] / spec["steps"] if spec["steps"] else 0.0
        d = self.decode
        n = max(d["steps"], 1)
        decode_tokens = self.tokens - len(self.outputs)  # the first token of each request comes with its prefill
        out = {**self.meta, "label": self.label, "output_tokens": self.tokens, "wall_s": self.wall,
               "tokens_per_s": self.tokens / self.wall if self.wall else 0.0, "spec": spec,
               "prefill": {"steps": self.prefill["steps"], "wall_s": self.prefill["wall"]},
               "decode": {"steps": d["steps"], "wall_s": d["wall"],
                          "tokens_per_s": decode_tokens / d["wall"] if d["wall"] else 0.0,
                          "step_ms": 1e3 * d["wall"] / n, "target_ms": 1e3 * d["target"] / n,
                          "step_ms_median": 1e3 * sc.median(d["step_s"]) if d["step_s"] else 0.0,
                          "draft_ms": 1e3 * d["draft"] / n,
                          "other_ms": 1e3 * (d["wall"] - d["target"] - d["draft"]) / n,
                          "draft_forwards_per_step": d["draft_calls"] / n,
                          "draft_ms_per_forward": 1e3 * d["draft"] / d["draft_calls"] if d["draft_calls"] else 0.0,
                          "tokens_per_step": decode_tokens / n,
                          "experts_per_layer": d["experts"] / n}}
        dd = out["decode"]
        dd["tokens_per_s_median"] = 1e3 * dd["tokens_per_step"] / dd["step_ms_median"] if dd["step_ms_median"] else 0.0
        return out


def forward_ms_by_tokens(model, tokens_list: Sequence[int], context: int, reps: int) -> Dict[str, float]:
    """Median ms of one forward of a single sequence's chunk of t tokens at position `context`
    (a decode at t = 1, a verification of t - 1 drafts above), over paged KV, and the distinct
    experts each MoE layer ran (None for a dense model)."""
    bs = 16
    blocks = (context + max(tokens_list)) // bs + 2
    ex = ModelExecutor(model, blocks, bs)
    table = list(range(blocks))
    ex.execute([SeqChunk([7] * context, 0, table, True)])
    out = {}
    for t in tokens_list:
        times, touched = [], []
        for r in range(reps):
            chunk = [32 + (r * 7 + i * 13) % 90 for i in range(t)]  # printable bytes, varied per rep
            s = time.perf_counter()
            res = ex.execute([SeqChunk(chunk, context, table, True, t)])
            times.append(time.perf_counter() - s)
            if res.experts_touched:
                touched.append(sum(res.experts_touched) / len(res.experts_touched))
        out[str(t)] = {"ms": 1e3 * sc.median(times),
                       "experts_per_layer": sum(touched) / len(touched) if touched else None}
    return out


# ---------------------------------------------------------------- the measurements


def params_for(temperature: float, n_new: int, seed: int) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=n_new, ignore_eos=True,
                          seed=None if temperature == 0 else seed)


def measure(runners: List[Runner], prompts: List[List[int]], batch: int, temperature: float, n_new: int,
            warm: List[List[int]], seed: int) -> List[dict]:
    """Every runner generates every prompt, in batches of `batch`, in lockstep: each runner holds the
    same batch and they take one engine step each in turn (rotating who goes first), so load from
    other work on a shared CPU, which comes in bursts, falls on every configuration alike. Each
    runner's time is the sum of its own steps. One warm-up batch each first."""
    for r in runners:
        r.run({-1 - i: p for i, p in enumerate(warm[:batch])},
              {-1 - i: params_for(temperature, n_new, seed + 10_000 + i) for i in range(batch)})
        r.reset()
    groups = [list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)]
    turn = 0
    for group in groups:
        for r in runners:
            r.start({i: prompts[i] for i in group}, {i: params_for(temperature, n_new, seed + i) for i in group})
        while any(r.busy for r in runners):
            turn += 1
            for r in runners[turn % len(runners):] + runners[:turn % len(runners)]:
                if r.busy:
                    r.step()
    return [r.summary() | {"token_ids": [r.outputs[i] for i in range(len(prompts))]} for r in runners]


def repeat_share(prompt: Sequence[int], output: Sequence[int], n: int = 6) -> float:
    """Share of output tokens that complete an n-gram seen earlier in prompt + output: how much of
    the text repeats itself (a greedy tiny model falls into loops, which any drafter predicts)."""
    seq = list(prompt) + list(output)
    seen, hits = set(), 0
    for i in range(n - 1, len(seq)):
        g = tuple(seq[i - n + 1:i + 1])
        if i >= len(prompt) and g in seen:
            hits += 1
        seen.add(g)
    return hits / max(len(output), 1)


def engine_config(batch: int, dtype: str, method: Optional[str], k: int, blocks: int) -> EngineConfig:
    return EngineConfig(max_num_seqs=batch, max_batch_tokens=2048, kv_block_size=16, kv_cache_blocks=blocks,
                        dtype=dtype, speculative_method=method, speculative_tokens=k)


def sweep(target, cfg: ModelConfig, drafts: Dict[str, torch.nn.Module], ks: Sequence[int], batch: int,
          temperature: float, prompts, warm, n_new: int, dtype: str, seed: int, blocks: int,
          ngram: bool = False, log=print) -> dict:
    """Plain decoding, then speculative decoding with each draft at each k (and n-grams when asked),
    at one batch size and temperature: a row per configuration, ratios against plain."""
    runners = [Runner("plain", target, cfg, engine_config(batch, dtype, None, 1, blocks), meta={"method": "plain"})]
    for name, d in drafts.items():
        for k in ks:
            runners.append(Runner(f"draft {name} k={k}", target, cfg, engine_config(batch, dtype, "draft", k, blocks),
                                  draft=d, meta={"method": "draft", "draft": name, "k": k}))
    if ngram:
        for k in ks:
            runners.append(Runner(f"ngram k={k}", target, cfg, engine_config(batch, dtype, "ngram", k, blocks),
                                  meta={"method": "ngram", "k": k}))
    t = time.perf_counter()
    rows = measure(runners, prompts, batch, temperature, n_new, warm, seed)
    plain = rows[0]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / plain["tokens_per_s"]
        r["decode_speedup"] = r["decode"]["tokens_per_s"] / plain["decode"]["tokens_per_s"]
        r["decode_speedup_median"] = r["decode"]["tokens_per_s_median"] / plain["decode"]["tokens_per_s_median"]
        if temperature == 0:
            r["greedy_equal"] = r["token_ids"] == plain["token_ids"]
            r["greedy_equal_sequences"] = sum(a == b for a, b in zip(r["token_ids"], plain["token_ids"]))
    best = max(rows[1:], key=lambda r: r["tokens_per_s"]) if len(rows) > 1 else plain
    log(f"batch {batch}, temperature {temperature}: plain {plain['tokens_per_s']:.1f} tok/s; best {best['label']} "
        f"{best['tokens_per_s']:.1f} tok/s ({best['speedup']:.2f}x, acceptance {best['spec']['acceptance_rate']:.2f})"
        f" [{time.perf_counter() - t:.0f} s]")
    plain_text = {"repeat_share_6gram": sum(repeat_share(p, o) for p, o in zip(prompts, plain["token_ids"]))
                  / len(prompts),
                  "samples": [{"prompt": bytes(p).decode(errors="replace"),
                               "output": bytes([t for t in o if t < 256]).decode(errors="replace")}
                              for p, o in list(zip(prompts, plain["token_ids"]))[:2]]}
    return {"batch": batch, "temperature": temperature, "prompts": len(prompts), "new_tokens": n_new,
            "plain_output": plain_text, "rows": rows}


def explain(res: dict) -> dict:
    """Where a speculative decode step's time goes against a plain one, and what bounds the speed-up.

    Per sequence, tokens per step G = 1 + mean accepted length (tokens_per_step over plain's, which
    is the batch); a plain step costs P (target + other), a speculative one S = draft + target
    verify + other: speed-up = G * P / S. The ceilings: `free_draft` (the draft costs nothing):
    G * P / (S - draft); `ideal` (drafting costs nothing and a verification costs a plain decode): G."""
    plain = next(r for r in res["rows"] if r["method"] == "plain")["decode"]
    out = []
    for r in res["rows"]:
        if r["method"] == "plain":
            continue
        d = r["decode"]
        T = d["tokens_per_step"] / plain["tokens_per_step"]
        S, P = d["step_ms"], plain["step_ms"]
        out.append({"label": r["label"], "tokens_per_step_per_seq": T, "step_ms": S, "plain_step_ms": P,
                    "draft_ms": d["draft_ms"], "target_verify_ms": d["target_ms"], "other_ms": d["other_ms"],
                    "plain_target_ms": plain["target_ms"], "plain_other_ms": plain["other_ms"],
                    "share_draft": d["draft_ms"] / S, "share_verify": d["target_ms"] / S,
                    "share_other": d["other_ms"] / S, "verify_over_plain_target": d["target_ms"] / plain["target_ms"],
                    "experts_per_layer": d["experts_per_layer"], "plain_experts_per_layer": plain["experts_per_layer"],
                    "decode_speedup": T * P / S, "free_draft_speedup": T * P / (S - d["draft_ms"]),
                    "ideal_speedup": T})
    return {"batch": res["batch"], "temperature": res["temperature"], "rows": out}


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models, a few training steps: seconds")
    ap.add_argument("--retrain", action="store_true", help="train even when bench/.cache holds the weights")
    ap.add_argument("--ks", help="drafts per step to try, e.g. 2,3,4,5")
    ap.add_argument("--batches", help="batch sizes, e.g. 1,4 (the default)")
    ap.add_argument("--temperatures", default="0,0.8")
    ap.add_argument("--num-prompts", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--steps", type=int, help="training steps (the target and the drafts together)")
    ap.add_argument("--batch4-drafts", default="best",
                    help="drafts measured at batch > 1: 'best' (the fastest at batch 1 greedy), 'all', or names")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help=f"where trained weights are kept (default {CACHE})")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    preset_name = "smoke" if args.smoke else "default"
    preset = PRESETS[preset_name]
    tr = dict(preset["train"])
    if args.steps is not None:
        tr["steps"] = args.steps
    ks = [int(k) for k in args.ks.split(",")] if args.ks else preset["ks"]
    num_prompts = args.num_prompts or preset["num_prompts"]
    prompt_len = args.prompt_len or preset["prompt_len"]
    n_new = args.new_tokens or preset["new_tokens"]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else preset["batches"]
    temps = [float(t) for t in args.temperatures.split(",")]
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir) if args.cache_dir else CACHE
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    # 1. data
    data, held, data_key = load_code(preset["train_bytes"])
    log(f"data: {data_key['train_files']} stdlib files, {data.numel() / 1e6:.2f}M byte tokens for training, "
        f"{len(held)} files held out")
    cfg = ModelConfig(**preset["target"])
    if prompt_len + n_new > cfg.max_seq_len:
        raise SystemExit(f"--prompt-len {prompt_len} + --new-tokens {n_new} exceed the context ({cfg.max_seq_len})")
    held_blob = torch.frombuffer(bytearray(b"\n".join(held)), dtype=torch.uint8)
    held_windows = _windows(held_blob, tr["eval_windows"], tr["seq_len"], torch.Generator().manual_seed(99))
    prompts = code_prompts(held, num_prompts, prompt_len, prompt_len + n_new)
    warm = code_prompts(held[::-1], max(batches), prompt_len, prompt_len + n_new)
    rep_prompts = repetitive_prompts(held, num_prompts, prompt_len)

    # 2. training (or the cache)
    target, drafts, train_rec = train_models(cfg, {n: ModelConfig(**c) for n, c in preset["drafts"].items()}, tr,
                                             data, held_windows, args.seed, data_key, args.retrain, log, cache_dir)
    if args.dtype != "float32":
        for m in [target, *drafts.values()]:
            m.to(DTYPES[args.dtype])

    # How close each draft is to the target on held-out code, teacher-forced: argmax agreement (what
    # greedy acceptance is, per token, on the data's own text) and sum min(p, q) = 1 - total variation
    # (the exact rule's acceptance when both sample at temperature 1)
    with torch.no_grad():
        w = held_windows[:8, :-1]
        tl = target(w).float()
        agree, overlap = {}, {}
        for n, d in drafts.items():
            dl = d(w).float()
            agree[n] = float((dl.argmax(-1) == tl.argmax(-1)).float().mean())
            overlap[n] = float(torch.minimum(dl.softmax(-1), tl.softmax(-1)).sum(-1).mean())
    log("against the target on held-out code: " + ", ".join(
        f"{n} argmax agreement {agree[n]:.2f}, sum min(p, q) {overlap[n]:.2f}" for n in drafts))

    results: Dict[str, object] = {
        "preset": preset_name, "dtype": args.dtype, "threads": args.threads, "machine": machine(torch.device("cpu")),
        "target": {"config": cfg.to_dict(), **train_rec["models"]["target"]},
        "drafts": {n: {"config": drafts[n].cfg.to_dict(), **train_rec["models"][n], "argmax_agreement": agree[n],
                       "overlap_t1": overlap[n]} for n in drafts},
        "training": {k: v for k, v in train_rec.items() if k != "models"}, "train": tr, "data": data_key,
        "prompt_len": prompt_len, "new_tokens": n_new, "num_prompts": num_prompts,
        "ks": ks, "batches": batches, "temperatures": temps, "sweeps": [], "errors": []}

    # 3. the sweeps
    blocks = max(batches) * (-(-cfg.max_seq_len // 16) + 2) * 2
    fwd = {"target": forward_ms_by_tokens(target, [1, 2, 3, 4, 5, 6], prompt_len + n_new // 2, 3 if args.smoke else 15)}
    for n, d in drafts.items():
        fwd[n] = forward_ms_by_tokens(d, [1, 2, 6], prompt_len + n_new // 2, 3 if args.smoke else 15)
    log("one forward at batch 1 by tokens in the pass: " + "; ".join(
        f"{n} " + ", ".join(f"{t}: {v['ms']:.1f} ms" for t, v in row.items()) for n, row in fwd.items()))
    best = None
    for b in sorted(batches):
        if b == 1 or args.batch4_drafts == "all":
            use = drafts
        elif args.batch4_drafts == "best":
            use = {best: drafts[best]} if best else drafts
        else:
            use = {n: drafts[n] for n in args.batch4_drafts.split(",")}
        for temp in temps:
            sw = sweep(target, cfg, use, ks, b, temp, prompts, warm, n_new, args.dtype, args.seed, blocks, log=log)
            results["sweeps"].append(sw)
            if b == 1 and best is None and len(sw["rows"]) > 1:
                best = max(sw["rows"][1:], key=lambda r: r["tokens_per_s"])["draft"]
    results["best_draft_batch1"] = best
    # n-grams (and the best draft, for comparison) on prompts that repeat code, greedy, batch 1
    first = {best: drafts[best]} if best else dict(list(drafts.items())[:1])
    rep = sweep(target, cfg, first, ks, 1, 0.0, rep_prompts, warm, n_new, args.dtype, args.seed, blocks,
                ngram=True, log=log)
    rep["workload"] = "repetitive"
    results["repetitive"] = rep

    # 4. where the time goes
    results["forward_ms_by_tokens"] = fwd
    results["breakdown"] = [explain(s) for s in results["sweeps"]]
    results["wall_s"] = time.perf_counter() - t_start

    failures = []
    for s in [*results["sweeps"], rep]:
        for r in s["rows"]:
            if r.get("greedy_equal") is False:
                failures.append(f"batch {s['batch']} {r['label']}: {r['greedy_equal_sequences']}/{s['prompts']} "
                                f"sequences equal plain greedy")
    results["greedy_equal_all"] = not failures
    results["errors"] = failures

    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "serve_spec_smoke.json" if args.smoke else "serve_spec.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(results))
    for s in [*slim["sweeps"], slim["repetitive"]]:
        for r in s["rows"]:
            r.pop("token_ids", None)
    out.write_text(json.dumps(slim, indent=1) + "\n")
    print_table(slim, out)
    if failures:
        raise SystemExit("greedy speculative output differs from plain greedy: " + "; ".join(failures))


def print_table(r: dict, out: Path) -> None:
    t = r["target"]
    print(f"\n{r['preset']}: target {t['params_total'] / 1e6:.1f}M params ({t['params_active'] / 1e6:.1f}M active), "
          f"held-out loss {t['held_out_loss']:.3f}; {r['dtype']}, {r['threads']} thread(s), "
          f"{r['num_prompts']} prompts x ({r['prompt_len']} prompt + {r['new_tokens']} new tokens)")
    for n, d in r["drafts"].items():
        print(f"  draft {n}: {d['params_total'] / 1e6:.2f}M params, held-out loss {d['held_out_loss']:.3f}, "
              f"argmax agreement {d['argmax_agreement']:.2f}, sum min(p, q) {d['overlap_t1']:.2f}")
    hdr = (f"{'config':>20} {'tok/s':>7} {'x plain':>7} {'x med':>6} {'accept':>7} {'acc len':>7} {'tok/step':>8} "
           f"{'step ms':>8} {'draft':>6} {'target':>7} {'other':>6} {'experts':>7} {'greedy=':>7}")
    for s in [*r["sweeps"], r["repetitive"]]:
        print(f"\nbatch {s['batch']}, temperature {s['temperature']}"
              + (f", {s['workload']} workload" if s.get("workload") else "")
              + f"  (ms per decode step; plain output repeats itself: "
              f"{s['plain_output']['repeat_share_6gram']:.0%} of tokens end a 6-gram seen before)")
        print(hdr)
        for row in s["rows"]:
            d, sp = row["decode"], row["spec"]
            eq = "-" if "greedy_equal" not in row else ("yes" if row["greedy_equal"] else "NO")
            print(f"{row['label']:>20} {row['tokens_per_s']:>7.1f} {row['speedup']:>7.2f} "
                  f"{row['decode_speedup_median']:>6.2f} "
                  f"{sp['acceptance_rate']:>7.2f} {sp['mean_accepted_length']:>7.2f} {d['tokens_per_step']:>8.2f} "
                  f"{d['step_ms']:>8.1f} {d['draft_ms']:>6.1f} {d['target_ms']:>7.1f} {d['other_ms']:>6.1f} "
                  f"{d['experts_per_layer']:>7.1f} {eq:>7}")
    print("\none forward at batch 1 by tokens in the pass: ms (distinct experts per MoE layer)")
    for n, row in r["forward_ms_by_tokens"].items():
        print(f"  {n:>8}: " + "  ".join(f"{k} tok {v['ms']:.2f}" + (f" ({v['experts_per_layer']:.1f})"
                                                                   if v["experts_per_layer"] else "")
                                        for k, v in row.items()))
    for b in r["breakdown"]:
        if b["batch"] == 1 and b["temperature"] == 0 and b["rows"]:
            x = max(b["rows"], key=lambda e: e["decode_speedup"])
            print(f"\nbatch 1 greedy, best {x['label']}: {x['tokens_per_step_per_seq']:.2f} tokens/step; step "
                  f"{x['step_ms']:.1f} ms = draft {x['draft_ms']:.1f} + verify {x['target_verify_ms']:.1f} + other "
                  f"{x['other_ms']:.1f} against plain {x['plain_step_ms']:.1f} (target {x['plain_target_ms']:.1f}); "
                  f"decode speed-up {x['decode_speedup']:.2f}x, with a free draft {x['free_draft_speedup']:.2f}x, "
                  f"ideal {x['ideal_speedup']:.2f}x")
    print(f"\ngreedy speculative == plain greedy everywhere: {r['greedy_equal_all']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
