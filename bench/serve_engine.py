"""The serving engine against Hugging Face `generate` and vLLM on this CPU, same weights, same prompts.

One run, side by side (issue 10's benchmark acceptance line):

  1. offline greedy throughput at batch 1 / 16 / 64 (equal prompts, static batch):
     moray's `LLM.generate`, HF `MixtralForCausalLM.generate`, vLLM's `LLM.generate`;
     tokens/s = batch x new tokens / wall time of the whole call (prefill included),
     median of --reps after a warm-up, each rep on fresh prompts (no prefix-cache hits);
     greedy agreement (token ids) of ours and vLLM's against HF;
  2. Poisson arrivals with mixed prompt / output lengths (one seed): moray continuous
     (requests added as they arrive), moray static and HF static (when idle, take what
     has arrived, run it to completion), vLLM continuous: throughput, TTFT and TPOT p50/p99;
  3. a profile of one moray decode step at batch 16 (cProfile and torch.profiler, top costs).

The weights: a Mixtral built from a moray config, saved with moray.model.hf.save_hf_dir
to runs/bench_serve/<preset>/hf; every system loads that directory. vLLM runs in its own
venv (bench/.venv-vllm, installed by bench/vllm_install.py) in a subprocess; where it
cannot be installed or imported the vLLM columns are skipped with the reason recorded.

    python bench/serve_engine.py                 # default: d 256, 4 layers, 8 experts top-2, a few minutes
    python bench/serve_engine.py --reference     # the issue's 286M Mixtral, bf16, 128 + 128 tokens
    python bench/serve_engine.py --smoke         # toy size, the plumbing in under a minute
    python bench/serve_engine.py --no-vllm       # skip vLLM (and its install)

Writes bench/results/serve_engine.json (--smoke: serve_engine_smoke.json); the table is printed last.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_common import ROOT, machine  # noqa: E402  (puts the repo on sys.path)
import serve_common as sc  # noqa: E402
import vllm_install  # noqa: E402

from moray.model import ModelConfig, build_model, count_params  # noqa: E402
from moray.model.hf import save_hf_dir  # noqa: E402

PRESETS = {
    # the issue's reference: 286M parameters (d 768, 8 layers, 8 experts top-2, 1 KV head)
    "reference": dict(model=dict(vocab_size=32000, d_model=768, n_layers=8, n_heads=12, n_kv_heads=1,
                                 ffn_hidden=1536, n_experts=8, top_k=2, max_seq_len=512, init_std=0.05),
                      prompt_len=128, new_tokens=128, dtype="bfloat16", reps=3, poisson_n=64),
    "default": dict(model=dict(vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=1,
                               ffn_hidden=512, n_experts=8, top_k=2, max_seq_len=512, init_std=0.1),
                    # 256 requests: with 64 the run is mostly ramp-up and the last arrivals' tail
                    prompt_len=128, new_tokens=128, dtype="bfloat16", reps=3, poisson_n=256),
    "smoke": dict(model=dict(vocab_size=320, d_model=128, n_layers=2, n_heads=4, n_kv_heads=1,
                             ffn_hidden=128, n_experts=4, top_k=2, max_seq_len=256, init_std=0.1),
                  prompt_len=16, new_tokens=8, dtype="float32", reps=1, poisson_n=12),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# ---------------------------------------------------------------- the systems


class Ours:
    name = "moray"

    def __init__(self, path: str, dtype: str, max_num_seqs: int, max_batch_tokens: int):
        from moray.serve.engine import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        self.overrides = dict(dtype=dtype, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens)
        self.llm = LLM(path, **self.overrides)
        self.core = self.llm.core

    def generate(self, prompts, n_new: int) -> List[List[int]]:
        p = self.SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True)
        return [o.outputs[0].token_ids for o in self.llm.generate(prompts, p)]

    # arrivals
    def add(self, a: sc.Arrival, arrival_time: float) -> None:
        p = self.SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
        self.core.add_request(str(a.index), a.prompt, p, arrival_time=arrival_time)

    def step(self):
        return [(int(o.request_id), len(o.outputs[0].token_ids)) for o in self.core.step()]

    def busy(self) -> bool:
        return self.core.has_unfinished_requests()

    def run_batch(self, batch, saw) -> None:
        t = time.monotonic()
        for a in batch:
            self.add(a, t)
        while self.busy():
            for index, n in self.step():
                saw(index, n)


class HF:
    name = "hf"

    def __init__(self, path: str, dtype: str):
        from transformers import MixtralForCausalLM

        self.model = MixtralForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()

    @torch.inference_mode()
    def generate(self, prompts, n_new: int, criteria=None) -> List[List[int]]:
        width = max(len(p) for p in prompts)  # left padding, as batched generation needs
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=False, pad_token_id=0, eos_token_id=None,
                                  stopping_criteria=criteria)
        return out[:, width:].tolist()

    def run_batch(self, batch, saw) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        n = max(a.max_tokens for a in batch)
        start = [None]

        class Seen(StoppingCriteria):  # called after each generated token: the step's end
            def __call__(self, input_ids, scores, **kw):
                if start[0] is None:
                    start[0] = input_ids.shape[1] - 1
                step = input_ids.shape[1] - start[0]
                for a in batch:
                    saw(a.index, min(step, a.max_tokens))
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        self.generate([a.prompt for a in batch], n, StoppingCriteriaList([Seen()]))


# ---------------------------------------------------------------- measurements


def agreement(ours: List[List[int]], ref: List[List[int]]) -> Dict[str, float]:
    """Sequences identical, and the mean fraction of tokens before the first divergence."""
    same, prefix = 0, []
    for a, b in zip(ours, ref):
        same += a == b
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(k / max(len(b), 1))
    n = max(len(ref), 1)
    return {"sequences_equal": same / n, "prefix_fraction": sum(prefix) / n}


def offline(systems, prompt_sets, warm, batches, n_new: int, reps: int, log) -> Dict[str, dict]:
    """Per batch size: each system's seconds per rep (alternating, so noise hits all alike)."""
    res = {}
    for b in batches:
        for s in systems:
            s.generate(warm[:b], n_new)
        row = {s.name: {"seconds": []} for s in systems}
        for r in range(reps):
            for s in systems:
                t = time.perf_counter()
                ids = s.generate(prompt_sets[r][:b], n_new)
                row[s.name]["seconds"].append(time.perf_counter() - t)
                row[s.name]["token_ids"] = ids
        for s in systems:
            row[s.name]["tokens_per_s"] = [b * n_new / x for x in row[s.name]["seconds"]]
            row[s.name]["median_tokens_per_s"] = sc.median(row[s.name]["tokens_per_s"])
        log(f"batch {b}: " + ", ".join(f"{s.name} {row[s.name]['median_tokens_per_s']:.0f} tok/s" for s in systems))
        res[str(b)] = row
    return res


def run_vllm(hf_dir: Path, args, cfg: ModelConfig, prompt_sets, warm, arrivals, log) -> dict:
    status = vllm_install.ensure_vllm(allow_install=not args.no_install)
    info = {"install": {k: v for k, v in status.items() if k != "steps"}}
    if not status.get("ok"):
        info["skipped"] = status.get("reason")
        log(f"vLLM skipped: {info['skipped']}")
        return info
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        reps = args.reps
        job.write_text(json.dumps({
            "model": str(hf_dir), "dtype": args.dtype, "max_model_len": cfg.max_seq_len,
            "max_num_seqs": max(args.batches), "batches": args.batches, "new_tokens": args.new_tokens,
            "prompt_sets": [warm] + prompt_sets[:reps],
            "poisson": {"arrivals": [asdict(a) for a in arrivals]} if arrivals else None,
        }))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gib), OMP_NUM_THREADS=str(args.threads),
                   VLLM_CPU_OMP_THREADS_BIND="0" if args.threads == 1 else f"0-{args.threads - 1}", VLLM_LOGGING_LEVEL="WARNING",
                   TOKENIZERS_PARALLELISM="false", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        t0 = time.perf_counter()
        log("vLLM: running bench/vllm_worker.py in bench/.venv-vllm ...")
        log_path = ROOT / "bench" / "results" / "serve_engine_vllm.log"
        # Output to a file, not pipes: vLLM's engine processes inherit them and would hold them open.
        # Its own session, so what it leaves behind is ended by its group id after it returns.
        with open(log_path, "w") as lf:
            p = subprocess.Popen([status["python"], str(Path(__file__).with_name("vllm_worker.py")), str(job),
                                  str(out)], env=env, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = p.wait(timeout=args.vllm_timeout)
            except subprocess.TimeoutExpired:
                rc = "timeout"
            finally:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
        info["wall_s"] = time.perf_counter() - t0
        info["log"] = str(log_path)
        if out.exists():
            info.update(json.loads(out.read_text()))
        if rc != 0 or not out.exists():
            tail = [ln for ln in log_path.read_text().splitlines() if "Traceback" in ln or "Error" in ln][-4:]
            info["skipped" if not out.exists() else "worker_error"] = f"worker exited {rc}: " + " | ".join(tail)
            log(f"vLLM worker: {info.get('skipped') or info.get('worker_error')}")
    return info


def profile_decode(ours: Ours, prompts, top: int = 12) -> dict:
    """One moray decode step at batch len(prompts): cProfile (Python) and torch.profiler (ops)."""
    core = ours.core
    p = ours.SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i, pr in enumerate(prompts):
        core.add_request(f"prof-{i}", pr, p)
    started = set()
    while len(started) < len(prompts):  # every prompt prefilled and its first token out
        started.update(o.request_id for o in core.step() if o.outputs[0].token_ids)
    for _ in range(3):
        core.step()  # warm decode steps
    times = []
    for _ in range(5):
        t = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        core.step()
    prof.disable()
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("tottime")
    rows = []
    for (fn_file, line, fn), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        rows.append({"function": f"{Path(fn_file).name}:{line}:{fn}", "calls_per_step": nc / 5,
                     "self_ms_per_step": 1e3 * tt / 5, "cum_ms_per_step": 1e3 * ct / 5})
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as tp:
        for _ in range(5):
            core.step()
    ops = sorted(tp.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    op_rows = [{"op": e.key, "calls_per_step": e.count / 5, "self_ms_per_step": e.self_cpu_time_total / 5e3}
               for e in ops]
    for i in range(len(prompts)):
        core.abort_request(f"prof-{i}")
    return {"batch": len(prompts), "step_ms_median": 1e3 * sc.median(times), "cprofile_top": rows,
            "torch_ops_top": op_rows}


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true", help="toy size: the plumbing in under a minute")
    g.add_argument("--reference", action="store_true", help="the issue's 286M Mixtral (bf16, 128 + 128)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--dtype", choices=sorted(DTYPES))
    ap.add_argument("--reps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch-tokens", type=int, default=2048, help="moray's token budget per step")
    ap.add_argument("--poisson-n", type=int, help="requests in the Poisson test")
    ap.add_argument("--rate", type=float, default=None,
                    help="Poisson arrivals per second (default: 2x what HF's batch-16 throughput serves)")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM")
    ap.add_argument("--no-install", action="store_true", help="use bench/.venv-vllm only if it is there")
    ap.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    ap.add_argument("--vllm-timeout", type=int, default=1800)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads for every system (vLLM: OMP threads bound to cores 0..N-1); on a "
                         "CPU shared with other work use 1: a 2-thread op waits for a descheduled thread")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    preset_name = "smoke" if args.smoke else "reference" if args.reference else "default"
    preset = PRESETS[preset_name]
    for k in ("prompt_len", "new_tokens", "dtype", "reps", "poisson_n"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.smoke:
        args.batches = [1, 4, 8]
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    cfg = ModelConfig(**preset["model"])
    hf_dir = ROOT / "runs" / "bench_serve" / preset_name / "hf"
    save_hf_dir(hf_dir, cfg, build_model(cfg, seed=args.seed).state_dict(), dtype=DTYPES[args.dtype],
                overwrite=True)
    params = count_params(cfg)
    log(f"{preset_name}: {params.total / 1e6:.1f}M parameters ({params.active / 1e6:.1f}M active), "
        f"{args.dtype}, {args.prompt_len} prompt + {args.new_tokens} new tokens -> {hf_dir}")

    bmax = max(args.batches)
    warm = sc.make_prompts(bmax, args.prompt_len, cfg.vocab_size, args.seed + 999)
    prompt_sets = [sc.make_prompts(bmax, args.prompt_len, cfg.vocab_size, args.seed + r) for r in range(args.reps)]

    ours = Ours(str(hf_dir), args.dtype, max_num_seqs=bmax, max_batch_tokens=args.max_batch_tokens)
    hf = HF(str(hf_dir), args.dtype)
    results: Dict[str, object] = {"preset": preset_name, "model": cfg.to_dict(), "params_total": params.total,
                                  "params_active": params.active, "dtype": args.dtype,
                                  "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                  "reps": args.reps, "batches": args.batches, "machine": machine(torch.device("cpu")),
                                  "engine": ours.overrides, "threads": args.threads, "errors": []}

    # 1. offline throughput, ours and HF
    off = offline([ours, hf], prompt_sets, warm, args.batches, args.new_tokens, args.reps, log)

    # greedy agreement in float32 as well (bf16 rounds differently in each implementation)
    agree32 = None
    if args.dtype != "float32":
        n32 = min(16, bmax)
        o32, h32 = Ours(str(hf_dir), "float32", bmax, args.max_batch_tokens), HF(str(hf_dir), "float32")
        agree32 = agreement(o32.generate(prompt_sets[0][:n32], args.new_tokens),
                            h32.generate(prompt_sets[0][:n32], args.new_tokens))
        agree32["sequences"] = n32
        del o32, h32
        log(f"float32 greedy agreement ours vs HF over {n32} sequences: {agree32}")

    # 2. Poisson workload (one seed), rate from HF's batch-16 throughput unless given
    out_range = (max(1, args.new_tokens // 8), args.new_tokens * 2 if not args.smoke else 12)
    prompt_range = (max(1, args.prompt_len // 8), args.prompt_len * 2 if not args.smoke else 24)
    mean_out = sum(out_range) / 2
    ref_b = "16" if "16" in off else str(args.batches[-1])
    rate = args.rate or 2.0 * off[ref_b]["hf"]["median_tokens_per_s"] / mean_out
    arrivals = sc.poisson_workload(args.poisson_n, rate, prompt_range, out_range, cfg.vocab_size, args.seed + 7)
    log(f"Poisson: {len(arrivals)} requests at {rate:.2f}/s, prompts {prompt_range}, outputs {out_range}")
    warm_arr = [sc.Arrival(1000 + i, 0.0, a.prompt, min(4, a.max_tokens)) for i, a in enumerate(arrivals[:4])]
    ours.run_batch(warm_arr, lambda i, n: None)
    hf.run_batch(warm_arr, lambda i, n: None)
    poisson = {"rate_per_s": rate, "prompt_range": prompt_range, "output_range": out_range, "n": len(arrivals),
               "seed": args.seed + 7, "systems": {}}
    poisson["systems"]["moray_continuous"] = sc.drive_continuous(arrivals, ours.add, ours.step, ours.busy)
    log(f"  moray continuous: {poisson['systems']['moray_continuous']['tokens_per_s']:.0f} tok/s")
    poisson["systems"]["moray_static"] = sc.drive_static(arrivals, ours.run_batch, bmax)
    log(f"  moray static: {poisson['systems']['moray_static']['tokens_per_s']:.0f} tok/s")
    poisson["systems"]["hf_static"] = sc.drive_static(arrivals, hf.run_batch, bmax)
    log(f"  HF static: {poisson['systems']['hf_static']['tokens_per_s']:.0f} tok/s")

    # 3. the profile of a decode step at batch 16
    if not args.no_profile:
        results["profile"] = profile_decode(ours, prompt_sets[0][:min(16, bmax)])
        log(f"decode step at batch {results['profile']['batch']}: {results['profile']['step_ms_median']:.1f} ms")
    del ours, hf  # free the CPU's memory before vLLM starts

    # vLLM (its own venv, a subprocess): the same prompt sets and arrivals
    vl = {"skipped": "--no-vllm"} if args.no_vllm else run_vllm(hf_dir, args, cfg, prompt_sets, warm, arrivals, log)
    if "batches" in vl:
        for b, row in vl["batches"].items():
            if b in off:
                off[b]["vllm"] = {**row, "median_tokens_per_s": sc.median(row["tokens_per_s"])}
    if vl.get("poisson"):
        poisson["systems"]["vllm_continuous"] = vl["poisson"]
    results["vllm"] = {k: v for k, v in vl.items() if k not in ("batches", "poisson")}

    # agreement and ratios
    for b, row in off.items():
        ref = row["hf"]["token_ids"]
        row["agreement_vs_hf"] = {name: agreement(row[name]["token_ids"], ref) for name in row if name != "hf"}
        row["ours_over_hf"] = row["moray"]["median_tokens_per_s"] / row["hf"]["median_tokens_per_s"]
        if "vllm" in row:
            row["ours_over_vllm"] = row["moray"]["median_tokens_per_s"] / row["vllm"]["median_tokens_per_s"]
    ps = poisson["systems"]
    poisson["continuous_over_hf_static"] = ps["moray_continuous"]["tokens_per_s"] / ps["hf_static"]["tokens_per_s"]
    poisson["continuous_over_moray_static"] = (ps["moray_continuous"]["tokens_per_s"]
                                               / ps["moray_static"]["tokens_per_s"])
    if "vllm_continuous" in ps:
        poisson["continuous_over_vllm"] = ps["moray_continuous"]["tokens_per_s"] / ps["vllm_continuous"]["tokens_per_s"]
    results.update(offline=off, agreement_float32=agree32, poisson=poisson, wall_s=time.perf_counter() - t_start)

    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "serve_engine_smoke.json" if args.smoke else
        "serve_engine_reference.json" if args.reference else "serve_engine.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(results))
    for row in slim["offline"].values():
        for name in ("moray", "hf", "vllm"):
            if name in row:
                row[name].pop("token_ids", None)
    out.write_text(json.dumps(slim, indent=1) + "\n")
    print_table(results, out)


def print_table(r: dict, out: Path) -> None:
    print()
    v = r["vllm"]
    print(f"{r['preset']}: {r['params_total'] / 1e6:.1f}M params, {r['dtype']}, "
          f"{r['prompt_len']} prompt + {r['new_tokens']} new tokens, greedy, median of {r['reps']}")
    if v.get("skipped"):
        print(f"vLLM skipped: {v['skipped']}")
    print(f"{'batch':>5} {'moray tok/s':>12} {'HF tok/s':>10} {'vLLM tok/s':>11} {'/HF':>6} {'/vLLM':>6}"
          f" {'agree HF':>9} {'vLLM agree HF':>14}")
    for b, row in r["offline"].items():
        vt = row.get("vllm", {}).get("median_tokens_per_s")
        ag = row["agreement_vs_hf"]
        print(f"{b:>5} {row['moray']['median_tokens_per_s']:>12.0f} {row['hf']['median_tokens_per_s']:>10.0f} "
              f"{'-' if vt is None else round(vt):>11} {row['ours_over_hf']:>6.2f} "
              f"{row.get('ours_over_vllm', float('nan')):>6.2f} {ag['moray']['sequences_equal']:>9.0%} "
              f"{format(ag['vllm']['sequences_equal'], '.0%') if 'vllm' in ag else '-':>14}")
    if r.get("agreement_float32"):
        a = r["agreement_float32"]
        print(f"float32 greedy, ours vs HF: {a['sequences_equal']:.0%} of {a['sequences']} sequences equal, "
              f"{a['prefix_fraction']:.0%} of tokens before a divergence")
    p = r["poisson"]
    print(f"\nPoisson: {p['n']} requests at {p['rate_per_s']:.2f}/s, prompts {p['prompt_range']}, "
          f"outputs {p['output_range']} tokens")
    print(f"{'system':>17} {'tok/s':>7} {'TTFT p50':>9} {'p99':>7} {'TPOT p50':>9} {'p99':>7}  (ms)")
    for name, s in p["systems"].items():
        print(f"{name:>17} {s['tokens_per_s']:>7.0f} {1e3 * s['ttft_p50_s']:>9.0f} {1e3 * s['ttft_p99_s']:>7.0f} "
              f"{1e3 * s['tpot_p50_s']:>9.1f} {1e3 * s['tpot_p99_s']:>7.1f}")
    print(f"continuous / HF static {p['continuous_over_hf_static']:.2f}x, / moray static "
          f"{p['continuous_over_moray_static']:.2f}x" + (f", / vLLM {p['continuous_over_vllm']:.2f}x"
                                                          if "continuous_over_vllm" in p else ""))
    if r.get("profile"):
        pr = r["profile"]
        print(f"\ndecode step at batch {pr['batch']}: {pr['step_ms_median']:.1f} ms; top torch ops (self ms/step):")
        for o in pr["torch_ops_top"][:6]:
            print(f"  {o['self_ms_per_step']:7.2f}  {o['op']} x{o['calls_per_step']:.0f}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
