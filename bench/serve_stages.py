"""The stage gang against the in-process executor: what the hops cost, and how busy the pipeline is.

One random Mixtral-shaped model, saved once; the same requests through
- ModelExecutor in this process (as many torch threads as one stage actor has: see main()),
- RayExecutor at pp 2 (one stage actor per stage, cpus_per_actor CPUs each, a local Ray cluster),
  with 1 step in flight (each step waits for the last) and with pp steps in flight (the batch
  cut into pp disjoint parts, each part's next step submitted as soon as its last one is back),
  for each data path: "gang" (the driver calls every rank, activations go stage to stage over
  gloo send/recv) and "cgraph" (the whole step one Ray compiled graph, activations in its
  shared-memory channels: moray/actors/serve_graph.py). One gang at a time, gloo's before and
  after the compiled graph's, each round of each phase beside the in-process run; per row the
  median of all its rounds,
and, end to end, EngineCore greedy generation over each executor (tokens/s, token agreement).
Then one hop alone, gloo against compiled graphs, at a decode step's and a prefill chunk's
sizes (bench/serve_hops.py; --no-hops skips it).

Executor rows: B sequences prefilled in one step, then decode steps of one token per sequence
(teacher-forced ids: the logits are compared, not sampled). ms/step is the wall time per round
of B decode tokens; the hop cost is the gang's ms/step minus the in-process one, and the ratio
their quotient. busy = sum over stages of compute seconds (a stage leader's step seconds minus
its wait for the previous stage) / (stages x wall): 1 / pp is the best one step in flight can do
in a pipeline, and pp steps in flight can raise it towards 1.

    python bench/serve_stages.py            # bench model (d 256, 8 layers, 8 experts), B 16, 32 steps
    python bench/serve_stages.py --smoke    # tiny model, B 4, 4 steps: seconds, for CI

Prints tables and writes bench/results/serve_stages.json (serve_stages_smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moray.model import ModelConfig, build_model  # noqa: E402
from moray.model.safetensors_io import save_moray_dir  # noqa: E402
from moray.parallel.serving import ServeLayout  # noqa: E402
from moray.serve.engine.config import EngineConfig  # noqa: E402
from moray.serve.engine.core import EngineCore  # noqa: E402
from moray.serve.engine.executor import ModelExecutor, SeqChunk  # noqa: E402
from moray.serve.engine.loader import load_for_serving  # noqa: E402
from moray.serve.engine.sampling import SamplingParams  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BLOCK = 16
MODELS = {
    "bench": dict(vocab_size=512, d_model=256, n_layers=8, n_heads=8, n_kv_heads=1, ffn_hidden=512,
                  mlp="swiglu", n_experts=8, top_k=2, max_seq_len=256),
    "tiny": dict(vocab_size=320, d_model=128, n_layers=4, n_heads=4, n_kv_heads=1, ffn_hidden=256,
                 mlp="swiglu", n_experts=4, top_k=2, max_seq_len=256),
}


class Batch:
    """B sequences with fixed block tables and teacher-forced tokens: the prompts, then one id per step."""

    def __init__(self, b: int, prompt: int, steps: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        per_seq = -(-(prompt + steps) // BLOCK)
        self.tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
        self.prompts = [torch.randint(2, vocab, (prompt,), generator=g).tolist() for _ in range(b)]
        self.next = torch.randint(2, vocab, (steps, b), generator=g).tolist()
        self.blocks, self.prompt_len = b * per_seq + 1, prompt  # + the KV manager's reserved block

    def prefill(self, seqs) -> List[SeqChunk]:
        return [SeqChunk(self.prompts[i], 0, self.tables[i]) for i in seqs]

    def decode(self, t: int, seqs) -> List[SeqChunk]:
        return [SeqChunk([self.next[t][i]], self.prompt_len + t, self.tables[i]) for i in seqs]


def run_sequential(ex, batch: Batch, steps: int) -> Dict:
    """Every step over the whole batch, each waiting for the last."""
    seqs = range(len(batch.prompts))
    ex.execute(batch.prefill(seqs))
    logits, busy, t0 = [], [], time.perf_counter()
    for t in range(steps):
        if hasattr(ex, "gang"):
            h = ex.submit(batch.decode(t, seqs))
            res = ex.collect(h)
            busy.append([s - w for s, w in zip(h.stage_seconds, h.stage_wait_seconds)])
        else:
            res = ex.execute(batch.decode(t, seqs))
        logits.append(res.logits)
    return _row(time.perf_counter() - t0, steps, len(batch.prompts), busy, ex, logits)


def run_pipelined(ex, batch: Batch, steps: int, parts: int) -> Dict:
    """The batch in `parts` disjoint groups; each group's next step goes in as its last comes back,
    so up to `parts` steps are in flight (collected in submission order)."""
    b = len(batch.prompts)
    groups = [list(range(b))[i::parts] for i in range(parts)]
    ex.execute(batch.prefill(range(b)))
    queue, busy, done = [], [], {i: [] for i in range(parts)}
    t0 = time.perf_counter()
    for g, seqs in enumerate(groups):
        queue.append((g, 0, ex.submit(batch.decode(0, seqs))))
    while queue:
        g, t, h = queue.pop(0)
        res = ex.collect(h)
        busy.append([s - w for s, w in zip(h.stage_seconds, h.stage_wait_seconds)])
        done[g].append(res.logits)
        if t + 1 < steps:
            queue.append((g, t + 1, ex.submit(batch.decode(t + 1, groups[g]))))
    wall = time.perf_counter() - t0
    # Back in batch order, to compare with the sequential run's logits.
    logits = []
    for t in range(steps):
        rows = {seq: done[g][t][j] for g, seqs in enumerate(groups) for j, seq in enumerate(seqs)}
        logits.append(torch.stack([rows[i] for i in range(b)]))
    return _row(wall, steps, b, busy, ex, logits)


def _row(wall: float, steps: int, b: int, busy: List[List[float]], ex, logits) -> Dict:
    """busy: per collected step, each stage's compute seconds (none in process)."""
    row = {"wall_s": wall, "steps": steps, "tokens_per_s": steps * b / wall, "ms_per_step": 1e3 * wall / steps,
           "busy_fraction": None, "stage_compute_ms_per_step": None, "_logits": logits}
    if busy:
        per_stage = [sum(col) for col in zip(*busy)]
        row["busy_fraction"] = sum(per_stage) / (len(per_stage) * wall)
        row["stage_compute_ms_per_step"] = [1e3 * x / steps for x in per_stage]  # a round of B tokens
    return row


def gang_phase(way: str, transport: str, args, path: Path, cfg: ModelConfig, batch: Batch, local,
               engine: bool) -> Dict:
    """One gang alone on the cluster (a compiled graph's idle channel readers poll the CPU: a second
    gang beside it would tax the other's rows): start it, then `rounds` times in turn the in-process
    executor, the gang with 1 step in flight and with pp; its engine runs; shut it down."""
    from moray.serve.engine.ray_executor import RayExecutor

    t0 = time.perf_counter()
    ex = RayExecutor(str(path), cfg, ServeLayout(pp=args.pp), batch.blocks, BLOCK, dtype=torch.float32,
                     cpus_per_actor=args.cpus_per_actor, transport=transport)
    out = {"start_s": time.perf_counter() - t0, "runs": {}, "engine": {}}
    try:
        ex.gang.wait_standby()  # their imports would otherwise share the cores with the measurement
        run_sequential(local, batch, min(4, args.steps))  # warm both up
        run_sequential(ex, batch, min(4, args.steps))
        ways = [("in_process", lambda: run_sequential(local, batch, args.steps)),
                (f"{way}_1_in_flight", lambda: run_sequential(ex, batch, args.steps)),
                (f"{way}_{args.pp}_in_flight", lambda: run_pipelined(ex, batch, args.steps, args.pp))]
        for _ in range(args.rounds):
            for w, run in ways:
                out["runs"].setdefault(w, []).append(run())
        if engine:
            out["engine"][way] = engine_run(ex, cfg, None, batch, args.steps, args.batch)
            out["engine"][f"{way}_max_num_seqs_{args.batch // args.pp}"] = engine_run(
                ex, cfg, None, batch, args.steps, args.batch // args.pp)
        out["health"] = ex.health()
    finally:
        ex.shutdown()
    return out


def median_rows(phases: List[Dict]) -> Dict:
    """Per way, every round of every phase pooled: the run with the median ms/step, each round's beside it."""
    pooled: Dict[str, List[Dict]] = {}
    for ph in phases:
        for w, runs in ph["runs"].items():
            pooled.setdefault(w, []).extend(runs)
    out = {}
    for w, rs in pooled.items():
        out[w] = dict(sorted(rs, key=lambda r: r["ms_per_step"])[len(rs) // 2])
        out[w]["ms_per_step_rounds"] = [r["ms_per_step"] for r in rs]
    order = ["in_process"] + [w for w in out if w.endswith("_1_in_flight")] + \
        [w for w in out if w != "in_process" and not w.endswith("_1_in_flight")]
    return {w: out[w] for w in order}


def engine_run(executor, cfg: ModelConfig, model, batch: Batch, steps: int, max_num_seqs: int) -> Dict:
    """Greedy generation of `steps` tokens for every prompt through EngineCore."""
    ec = EngineConfig(kv_block_size=BLOCK, kv_cache_blocks=batch.blocks, max_num_seqs=max_num_seqs,
                      max_batch_tokens=4096, enable_prefix_caching=False)
    core = EngineCore(model, cfg, ec, executor=executor)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    for i, p in enumerate(batch.prompts):
        core.add_request(f"r{i}", p, params)
    out, n_steps, t0 = {}, 0, time.perf_counter()
    while core.has_unfinished_requests():
        out.update({o.request_id: o.token_ids for o in core.step() if o.finished})
        n_steps += 1
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "engine_steps": n_steps, "tokens_per_s": len(out) * steps / wall,
            "ms_per_engine_step": 1e3 * wall / n_steps, "_tokens": out}


SMOKE_HOP_SIZES = [(16, "decode B16"), (512, "prefill 512")]  # --smoke; else serve_hops.SIZES


def compare_transports(rows: Dict, engine: Dict, hops, pp: int) -> Dict:
    """The two data paths against each other: a hop alone, a decode step with 1 and with pp steps
    in flight, and what the engine serves (greedy tokens/s, pp steps in flight as it runs them).
    The engine's figures decide: they are the workload; the rest says where the time goes."""
    out: Dict = {}
    for k in ("1", str(pp)):
        g, c = rows.get(f"gang_{k}_in_flight"), rows.get(f"cgraph_{k}_in_flight")
        if g and c:
            out[f"step_{k}_in_flight"] = {"gloo_ms": g["ms_per_step"], "cgraph_ms": c["ms_per_step"],
                                          "cgraph_over_gloo": c["ms_per_step"] / g["ms_per_step"]}
    for k in [k for k in engine if k.startswith("gang")]:
        c = engine.get("cgraph" + k[len("gang"):])
        if c:
            out[f"engine_{k}"] = {"gloo_tokens_per_s": engine[k]["tokens_per_s"],
                                  "cgraph_tokens_per_s": c["tokens_per_s"],
                                  "cgraph_over_gloo": c["tokens_per_s"] / engine[k]["tokens_per_s"]}
    if hops is not None and hops["rows"]:
        ratios = sorted(r["cgraph_over_gloo"] for r in hops["rows"] if r.get("cgraph_over_gloo") is not None)
        if ratios:
            out["hop_cgraph_over_gloo_median"] = ratios[len(ratios) // 2]
        out["idle_cpu_s_per_s_two_actors"] = hops.get("idle_cpu_s_per_s_two_actors")
    served = [v["cgraph_over_gloo"] for k, v in out.items() if k.startswith("engine_")]
    if not served:
        out["decision"] = "no comparison: a data path did not run"
        return out
    better = all(x > 1 for x in served)  # compiled graph tokens/s over gloo's, every engine run
    parts = ["engine tokens/s, compiled graph / gloo: " + ", ".join(f"{x:.2f}x" for x in served)]
    parts += [f"step with {k.split('_')[1]} in flight {v['cgraph_ms']:.1f} vs {v['gloo_ms']:.1f} ms "
              f"({v['cgraph_over_gloo']:.2f}x)" for k, v in out.items() if k.startswith("step_")]
    if "hop_cgraph_over_gloo_median" in out:
        parts.append(f"one hop {out['hop_cgraph_over_gloo_median']:.1f}x (median)")
    out["decision"] = ("compiled graph" if better else "gloo") + " measures better for serving here: " + \
        "; ".join(parts)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, B 4, 4 steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=int, default=1)
    ap.add_argument("--local-threads", type=int, default=None,
                    help="torch threads of the in-process run (default: cpus-per-actor, what each rank has)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds per gang phase, each running every row in turn; the median is kept")
    ap.add_argument("--no-hops", action="store_true", help="skip the one-hop table (gloo against compiled graphs)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.rounds, name = 4, 4, 1, "tiny"
    else:
        name = "bench"
    import ray

    load_before = os.getloadavg()  # this machine is shared: the figures move with its load
    cfg = ModelConfig(**MODELS[name])
    # Each rank computes with cpus_per_actor threads, and so does the in-process run by default: on a
    # shared 2-core machine, 2 OpenMP threads stall at every op's barrier whenever one is descheduled
    # (measured: 374 ms against 37 ms per tiny decode step), which would be no fair baseline.
    threads = args.local_threads or args.cpus_per_actor
    torch.set_num_threads(threads)
    batch = Batch(args.batch, args.prompt, args.steps, cfg.vocab_size)
    path = Path(tempfile.mkdtemp(prefix="serve_stages_")) / "model"
    save_moray_dir(path, cfg, build_model(cfg, seed=0).state_dict())
    model = load_for_serving(str(path), dtype=torch.float32).model
    local = ModelExecutor(model, batch.blocks, BLOCK)

    # The gangs one at a time, gloo's before and after the compiled graph's (drift in the machine's
    # load then weighs on both alike); the hop table last, on the same cluster.
    ray.init(address="local", num_cpus=args.pp * args.cpus_per_actor, include_dashboard=False,
             log_to_driver=False)  # "local": a `ray start` cluster on this machine is someone else's
    plan = [("gang", "gloo"), ("cgraph", "cgraph")] + ([] if args.smoke else [("gang", "gloo")])
    phases, hops = [], None
    try:
        for i, (way, transport) in enumerate(plan):
            phases.append(gang_phase(way, transport, args, path, cfg, batch, local, engine=i < 2))
        if not args.no_hops:
            from serve_hops import measure_hops, print_hops

            hops = measure_hops(hops=40, rounds=1, sizes=SMOKE_HOP_SIZES) if args.smoke else measure_hops()
    finally:
        ray.shutdown()
    rows = median_rows(phases)
    start_s = {f"{w} (phase {i + 1})": ph["start_s"] for i, ((w, _), ph) in enumerate(zip(plan, phases))}
    health = phases[0]["health"]
    ref = [r["_logits"] for r in phases[0]["runs"]["in_process"]][0]
    for r in rows.values():
        got = r.pop("_logits")
        r["argmax_agreement"] = float(torch.cat([(a.argmax(-1) == b.argmax(-1)).float()
                                                 for a, b in zip(got, ref)]).mean())
        r["max_abs_logit_diff"] = max(float((a - b).abs().max()) for a, b in zip(got, ref))
    engine = {"in_process": engine_run(None, cfg, model, batch, args.steps, args.batch)}
    for ph in phases:
        engine.update(ph["engine"])
    ref_tokens = engine["in_process"]["_tokens"]
    for r in engine.values():
        r["same_tokens"] = r.pop("_tokens") == ref_tokens

    base = rows["in_process"]
    for r in rows.values():
        r["ratio_to_in_process"] = r["ms_per_step"] / base["ms_per_step"]
        r["hop_ms_per_step"] = r["ms_per_step"] - base["ms_per_step"]
    print(f"model {name}: d {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_experts} experts top-{cfg.top_k}; "
          f"B {args.batch}, prompt {args.prompt}, {args.steps} decode steps; pp {args.pp} x "
          f"{args.cpus_per_actor} CPU (in process: {threads} threads); gangs up in "
          + ", ".join(f"{k} {v:.1f} s" for k, v in start_s.items()))
    print(f"{'executor':<20}{'tok/s':>9}{'ms/step':>9}{'x local':>9}{'hop ms':>8}{'busy':>7}"
          f"{'stage ms':>14}{'argmax=':>9}")
    for k, r in rows.items():
        busy = f"{r['busy_fraction']:.2f}" if r["busy_fraction"] is not None else "-"
        stage = "/".join(f"{x:.1f}" for x in r["stage_compute_ms_per_step"] or []) or "-"
        print(f"{k:<20}{r['tokens_per_s']:>9.0f}{r['ms_per_step']:>9.2f}{r['ratio_to_in_process']:>9.2f}"
              f"{r['hop_ms_per_step']:>8.2f}{busy:>7}{stage:>14}{r['argmax_agreement']:>9.3f}")
    print(f"{'engine (greedy)':<26}{'tok/s':>9}{'ms/step':>9}{'steps':>7}{'same':>6}")
    for k, r in engine.items():
        print(f"{k:<26}{r['tokens_per_s']:>9.0f}{r['ms_per_engine_step']:>9.2f}{r['engine_steps']:>7}"
              f"{str(r['same_tokens']):>6}")
    transport = compare_transports(rows, engine, hops, args.pp)
    if hops is not None:
        print_hops(hops)
    print(transport["decision"])
    out = RESULTS / ("serve_stages_smoke.json" if args.smoke else "serve_stages.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "what": "decode steps through the Ray stage gang (pp stages; gang: gloo between them, cgraph: one Ray "
                "compiled graph) against the in-process ModelExecutor on the same model and tokens; busy = sum of "
                "stage compute / (stages x wall); hops: one (T, D) activation hop, gloo vs compiled graph",
        "model": {"name": name, **MODELS[name]}, "batch": args.batch, "prompt_tokens": args.prompt,
        "decode_steps": args.steps, "pp": args.pp, "cpus_per_actor": args.cpus_per_actor,
        "in_process_threads": threads, "dtype": "float32", "gang_start_s": start_s,
        "executor": rows, "engine": engine, "gang": health["actors"], "hops": hops, "transport": transport,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "host": platform.node(), "torch": torch.__version__, "ray": ray.__version__,
    }, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
