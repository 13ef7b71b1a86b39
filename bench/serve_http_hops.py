"""Where the Ray Serve app's time to first token goes, hop by hop: one streamed request at a
time through HTTP -> (Serve's proxy or HAProxy) -> ingress replica -> DeploymentHandle -> LLM
server replica -> engine thread -> first token -> back through both hops.

The app is moray's own code (moray/serve/app.py's ServeEngineClient and FastAPI app,
moray/serve/server.py's LLMServer) in deployments that note the time at each step
(time.monotonic: CLOCK_MONOTONIC, one clock for every process on the machine) and send it
back as SSE comment lines, which OpenAI clients skip. Two apps side by side on one cluster,
requests interleaved:

  serve_defaults   the handle as Serve makes it (object references through Ray's core
                   worker, routed on a router thread): the app before this benchmark's fix
  moray            the handle moray's ingress uses (`direct_handle`: gRPC to the replica,
                   routed on the ingress's own loop)

The cluster's HTTP front is one per run (`--ingress`; both: one cluster after the other).

    python bench/serve_http_hops.py                 # both fronts, a few minutes on 2 cores
    python bench/serve_http_hops.py --ingress haproxy --requests 20

Writes bench/results/serve_http_hops.json; a table per front last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

from serve_http_timed import MARK, VARIANTS, TimedIngress, TimedLLMServer, is_token  # noqa: E402

# (label, from, to): the steps of one request, in order
STEPS = [("client -> ingress ASGI (HTTP front)", "sent", "asgi"),
         ("ASGI -> route (body, FastAPI, pydantic)", "asgi", "route"),
         ("ingress handle -> LLM replica", "route", "replica"),
         ("replica -> engine (prepare, admit)", "replica", "arrival"),
         ("engine: queue -> scheduled", "arrival", "scheduled"),
         ("engine: prefill -> first token", "scheduled", "first_token"),
         ("engine thread -> replica loop", "first_token", "replica_got"),
         ("replica: format the chunk", "replica_got", "replica_sent"),
         ("LLM replica -> ingress", "replica_sent", "ingress_got"),
         ("ingress -> client (HTTP front)", "ingress_got", "received"),
         ("time to first token", "sent", "received")]


async def _one(http, prefix: str, ids: List[int], new_tokens: int) -> Dict[str, float]:
    import serve_http as common

    body = {"model": common.NAME, "prompt": ids, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    times = {"sent": time.monotonic()}
    async with http.stream("POST", f"/{prefix}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith(MARK):
                times.update(json.loads(line[len(MARK):]))
            elif "received" not in times and line.startswith("data: {") and is_token(line):
                times["received"] = time.monotonic()
    return times


def summarise(rows: List[Dict[str, float]]) -> Dict[str, dict]:
    out = {}
    for label, a, b in STEPS:
        xs = [1e3 * (r[b] - r[a]) for r in rows if r.get(a) is not None and r.get(b) is not None]
        if xs:
            out[label] = {"p50_ms": statistics.median(xs), "mean_ms": statistics.mean(xs)}
    engine = [1e3 * (r["first_token"] - r["arrival"]) for r in rows]
    ttft = [1e3 * (r["received"] - r["sent"]) for r in rows]
    out["outside the engine (TTFT - engine)"] = {"p50_ms": statistics.median([t - e for t, e in zip(ttft, engine)]),
                                                  "mean_ms": statistics.mean(ttft) - statistics.mean(engine)}
    return out


def run_cluster(ingress: str, args) -> dict:
    """One local cluster with `ingress` in front, both apps on it, the requests interleaved."""
    import httpx
    import ray
    from ray import serve

    import serve_http as common
    from moray.serve.cluster_env import apply, serve_env

    apply(serve_env(ingress))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCH), os.environ.get("PYTHONPATH", "")])
    model_dir = common.save_model(ROOT / "runs" / "bench_serve" / "hops" / "hf")
    cfg = common.serve_cfg(argparse.Namespace(clients=8))
    ray.init(address="local", num_cpus=len(VARIANTS) + 1, include_dashboard=False, log_to_driver=False)
    try:
        port = common.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, direct in VARIANTS.items():
            llm = TimedLLMServer.options(ray_actor_options={"num_cpus": 1})
            serve.run(TimedIngress.bind(llm.bind(str(model_dir), cfg), cfg, direct), name=name, route_prefix=f"/{name}")

        async def measure():
            rows = {n: [] for n in VARIANTS}
            names = list(VARIANTS)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
                for n in names:
                    for ids in common.prompts(args.warmup, args.prompt_len, 999):
                        await _one(http, n, ids, args.new_tokens)
                for i, ids in enumerate(common.prompts(args.requests, args.prompt_len, 1)):
                    for n in names[i % len(names):] + names[:i % len(names)]:
                        rows[n].append(await _one(http, n, ids, args.new_tokens))
            return rows

        rows = asyncio.run(measure())
        load = os.getloadavg()[0]
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"ingress": ingress, "load_avg_1m": load, "apps": {n: summarise(r) for n, r in rows.items()}}


def print_table(run: dict) -> None:
    names = list(run["apps"])
    print(f"\nHTTP front: {run['ingress']}; load avg {run['load_avg_1m']:.1f} on {os.cpu_count()} cores; p50 ms")
    print(f"{'step':>40} " + " ".join(f"{n:>15}" for n in names))
    for label in run["apps"][names[0]]:
        print(f"{label:>40} " + " ".join(f"{run['apps'][n].get(label, {}).get('p50_ms', float('nan')):>15.2f}"
                                          for n in names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ingress", choices=["both", "proxy", "haproxy"], default="both")
    ap.add_argument("--requests", type=int, default=40, help="streamed requests per app")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--one", choices=["proxy", "haproxy"], help=argparse.SUPPRESS)  # internal: one cluster
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.one:  # a cluster's settings are read when its processes start: one process per front
        print(json.dumps(run_cluster(args.one, args)))
        return
    runs = []
    for ingress in (["proxy", "haproxy"] if args.ingress == "both" else [args.ingress]):
        cmd = [sys.executable, __file__, "--one", ingress, "--requests", str(args.requests), "--warmup",
               str(args.warmup), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the {ingress} run failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print_table(runs[-1])
    out = Path(args.out) if args.out else BENCH / "results" / "serve_http_hops.json"
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
