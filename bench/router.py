"""What the multi-region router costs and how fast it fails over, side by side in one run.

Regions are real: two `python jobs/serve.py --ingress haproxy` processes (each its own local Ray
cluster with Serve, HAProxy in front) on the smallest model, and `moray route` in front of them,
each a separate process;
the router is also put in front of the plain FastAPI endpoint (no Ray Serve hops, its own
process), where a region answers in a few ms and the router's own cost is easier to see.

  latency     one non-streamed request at a time (1 token out), alternating direct -> region
              and router -> same region, so a shared machine's drifting load falls on both
              alike: p50 and p99, and the router's added p50 / p99
  ttft        the same for streams: time to the first token event
  throughput  C clients, each sending requests back to back, direct and through the router
              taking turns (4 runs of each; the medians)
  failover    requests back to back through the router to its own region; that region is
              killed (SIGKILL to its process tree); the time from the kill to the first request
              answered by the other region, and how many requests failed (the goal: none)

Goal: the router adds under 2 ms at p50 (headline: router vs direct on the same Ray Serve
region). The machine's load average is recorded: on 2 shared cores the figures are noisy.

    python bench/router.py                 # ~4 min on 2 shared cores
    python bench/router.py --smoke         # small counts, the same plumbing
    python bench/router.py --plain-endpoint MODEL PORT   # (internal) the no-Ray endpoint process

Writes bench/results/router.json (--smoke: router_smoke.json); a table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SERVE = ["serve.dtype=float32", "serve.model_name=tiny", "serve.kv_cache_blocks=256", "serve.max_num_seqs=16"]
INGRESS = "haproxy"  # what answers HTTP in front of a region's Serve app (jobs/serve.py --ingress)
BODY = {"model": "tiny", "prompt": "the moray hides in the reef", "max_tokens": 1, "temperature": 0,
        "ignore_eos": True}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300, help="sequential requests per path (latency, ttft)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (throughput)")
    p.add_argument("--throughput-requests", type=int, default=25, help="requests per client per throughput run")
    p.add_argument("--throughput-rounds", type=int, default=4, help="direct / router runs of each (alternating)")
    p.add_argument("--failovers", type=int, default=1, help="region losses to time (each restarts the region after)")
    p.add_argument("--smoke", action="store_true", help="small counts: the plumbing only")
    p.add_argument("--out", help="where to write the JSON (default bench/results/router.json)")
    p.add_argument("--plain-endpoint", nargs=2, metavar=("MODEL", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.requests, args.throughput_requests, args.clients, args.throughput_rounds = 20, 4, 4, 2
    return args


def plain_endpoint(model: str, port: int) -> None:
    """The endpoint's FastAPI app over its engine, without Ray, until killed."""
    import uvicorn

    from moray.platform.config import load_config
    from moray.serve.openai.api import build_api
    from moray.serve.openai.auth import APIKeys
    from moray.serve.server import LLMServer

    serve = load_config(None, SERVE).serve
    server = LLMServer.from_path(model, serve)
    try:
        uvicorn.run(build_api(server, serve, keys=APIKeys([])), host="127.0.0.1", port=port, log_level="warning")
    finally:
        server.engine.shutdown()  # its thread would keep the process alive after SIGTERM


def pct(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------- measurements


def sequential(client: httpx.Client, urls: dict, n: int, stream: bool) -> dict:
    """{name: [seconds]}: one request at a time, the paths taking turns (ABAB...)."""
    times = {name: [] for name in urls}
    body = {**BODY, "stream": stream, "max_tokens": 4 if stream else 1}
    for i in range(n + 5):
        for name, url in (urls.items() if i % 2 == 0 else reversed(list(urls.items()))):
            t0 = time.perf_counter()
            if stream:
                with client.stream("POST", url + "/v1/completions", json=body) as r:
                    assert r.status_code == 200, r.read()
                    lines = r.iter_lines()
                    for line in lines:
                        if line.startswith("data: {"):
                            break
                    elapsed = time.perf_counter() - t0
                    for _ in lines:
                        pass
            else:
                r = client.post(url + "/v1/completions", json=body)
                elapsed = time.perf_counter() - t0
                assert r.status_code == 200, r.text
            if i >= 5:  # the first few warm connections and caches
                times[name].append(elapsed)
    return times


def latency_row(times: dict, direct: str, routed: str) -> dict:
    d, r = times[direct], times[routed]
    return {"direct_p50_ms": 1e3 * pct(d, 50), "router_p50_ms": 1e3 * pct(r, 50),
            "direct_p99_ms": 1e3 * pct(d, 99), "router_p99_ms": 1e3 * pct(r, 99),
            "added_p50_ms": 1e3 * (pct(r, 50) - pct(d, 50)), "added_p99_ms": 1e3 * (pct(r, 99) - pct(d, 99)),
            "added_median_of_pairs_ms": 1e3 * statistics.median(b - a for a, b in zip(d, r)), "samples": len(d)}


async def _throughput(url: str, clients: int, per_client: int) -> dict:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as c:
        async def worker(i):
            lat = []
            for j in range(per_client):
                t0 = time.perf_counter()
                r = await c.post(url + "/v1/completions", json={**BODY, "prompt": f"worker {i} request {j}",
                                                                "max_tokens": 8})
                assert r.status_code == 200, r.text
                lat.append(time.perf_counter() - t0)
            return lat

        t0 = time.perf_counter()
        lats = sum(await asyncio.gather(*(worker(i) for i in range(clients))), [])
        wall = time.perf_counter() - t0
    return {"requests_per_s": len(lats) / wall, "latency_p50_ms": 1e3 * pct(lats, 50)}


def throughput(url_direct: str, url_router: str, args) -> dict:
    """Direct and router runs taking turns (DRRD DRRD ...), each figure the median of its runs."""
    runs = {"direct": [], "router": []}
    for i in range(args.throughput_rounds):
        order = (("direct", url_direct), ("router", url_router))
        for name, url in (order if i % 2 == 0 else order[::-1]):
            runs[name].append(asyncio.run(_throughput(url, args.clients, args.throughput_requests)))
    out = {}
    for name, rs in runs.items():
        out[f"{name}_requests_per_s"] = statistics.median(r["requests_per_s"] for r in rs)
        out[f"{name}_latency_p50_ms"] = statistics.median(r["latency_p50_ms"] for r in rs)
    out["router_vs_direct"] = out["router_requests_per_s"] / out["direct_requests_per_s"]
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kill_tree(proc) -> float:
    """SIGKILL a region's whole process tree; returns when the signals went out (perf_counter)."""
    import signal

    from router_helpers import _descendants

    pids = _descendants(proc.pid)
    at = time.perf_counter()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)
    return at


def failover(router_url: str, region: dict, other: str) -> dict:
    """Requests back to back through the router (a thread of their own) while `region` is killed:
    the time from the kill to the first answer from `other`, and the requests that failed."""
    import threading

    records, failures, stop = [], [], threading.Event()

    def client_loop():
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = client.post(router_url + "/v1/completions", json={**BODY, "max_tokens": 4})
                    if r.status_code != 200:
                        failures.append(r.status_code)
                    records.append((t0, time.perf_counter(), r.headers.get("x-moray-region")))
                except httpx.HTTPError as err:
                    failures.append(repr(err))

    thread = threading.Thread(target=client_loop, daemon=True)
    thread.start()
    pause = threading.Event()
    for _ in range(600):
        if len(records) >= 20:
            break
        pause.wait(0.05)
    killed_at = kill_tree(region["proc"])
    for _ in range(1200):  # bounded: until 20 requests began after the kill
        if sum(1 for start, _, _ in records if start > killed_at) >= 20:
            break
        pause.wait(0.05)
    stop.set()
    thread.join(60)
    first = min(end for _, end, name in records if name == other and end > killed_at)
    after = [end - start for start, end, _ in records if start > killed_at]
    return {"time_to_first_served_elsewhere_ms": 1e3 * (first - killed_at), "failed_requests": len(failures),
            "requests_after_loss": len(after), "latency_after_loss_p50_ms": 1e3 * pct(after, 50),
            "latency_before_loss_p50_ms": 1e3 * pct([e - s for s, e, _ in records if e < killed_at], 50)}


# ---------------------------------------------------------------- the run


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plain_endpoint:
        plain_endpoint(args.plain_endpoint[0], int(args.plain_endpoint[1]))
        return 0
    from router_helpers import start_region, stop_region, wait_healthy
    from serve_helpers import free_port, save_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_router_"))
    model = save_tiny_model(work / "tiny")
    result = {"args": {k: v for k, v in vars(args).items() if k != "plain_endpoint"}, "region_ingress": INGRESS,
              "cpus": os.cpu_count(), "load_avg_1m": {}}
    result["load_avg_1m"]["start"] = load_avg()
    procs = []
    try:
        regions = {}
        for name in ("east", "west"):
            port = free_port()
            log = work / f"{name}.log"
            regions[name] = {"url": f"http://127.0.0.1:{port}", "port": port, "log": log,
                             "proc": start_region(model, port, log, SERVE, args=("--ingress", INGRESS))}
            procs.append(regions[name]["proc"])
        plain_port = free_port()
        plain = subprocess.Popen([sys.executable, __file__, "--plain-endpoint", str(model), str(plain_port)],
                                 cwd=ROOT, stdout=open(work / "plain.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(plain)
        plain_url = f"http://127.0.0.1:{plain_port}"
        routers = {}
        for name, regs in (("serve", [("east", regions["east"]["url"]), ("west", regions["west"]["url"])]),
                           ("plain", [("plain", plain_url)])):
            cfg = {"router": {"region": regs[0][0]}, "regions": [{"name": n, "url": u} for n, u in regs]}
            (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "moray.platform.cli", "route", "--config",
                                     str(work / f"{name}.yaml"), "--port", str(port)], cwd=ROOT,
                                    stdout=open(work / f"router_{name}.log", "wb"), stderr=subprocess.STDOUT)
            procs.append(proc)
            routers[name] = (f"http://127.0.0.1:{port}", proc, work / f"router_{name}.log")
        wait_healthy(plain_url, plain, work / "plain.log")
        for r in regions.values():
            wait_healthy(r["url"], r["proc"], r["log"])
        for url, proc, log in routers.values():
            wait_healthy(url, proc, log, timeout_s=60)
        result["load_avg_1m"]["ready"] = load_avg()

        serve_router, plain_router = routers["serve"][0], routers["plain"][0]
        with httpx.Client(timeout=60) as client:
            print("latency (sequential, alternating)...", flush=True)
            times = sequential(client, {"direct": regions["east"]["url"], "router": serve_router,
                                        "plain": plain_url, "plain_router": plain_router}, args.requests, False)
            result["latency_serve"] = latency_row(times, "direct", "router")
            result["latency_plain"] = latency_row(times, "plain", "plain_router")
            print("time to first token (streams, alternating)...", flush=True)
            times = sequential(client, {"direct": regions["east"]["url"], "router": serve_router},
                               args.requests // 2, True)
            result["ttft_serve"] = latency_row(times, "direct", "router")
            result["load_avg_1m"]["latency"] = load_avg()
            print("throughput...", flush=True)
            result["throughput_serve"] = throughput(regions["east"]["url"], serve_router, args)
            cpu = cpu_seconds(routers["plain"][1].pid)
            result["throughput_plain"] = throughput(plain_url, plain_router, args)
            # the router runs of clients x requests each: the router process's CPU per request
            result["router_cpu_ms_per_request"] = 1e3 * (cpu_seconds(routers["plain"][1].pid) - cpu) / (
                args.throughput_rounds * args.clients * args.throughput_requests)
            result["load_avg_1m"]["throughput"] = load_avg()
            result["failover"] = []
            for i in range(args.failovers):
                print(f"failover {i + 1}/{args.failovers}: killing region east under load...", flush=True)
                result["failover"].append(failover(serve_router, regions["east"], "west"))
                if i + 1 < args.failovers:  # bring it back, and wait until the router uses it again
                    east = regions["east"]
                    east["proc"] = start_region(model, east["port"], east["log"], SERVE, args=("--ingress", INGRESS))
                    procs.append(east["proc"])
                    wait_healthy(east["url"], east["proc"], east["log"])
                    for _ in range(600):
                        if client.post(serve_router + "/v1/completions", json=BODY).headers.get(
                                "x-moray-region") == "east":
                            break
                        time.sleep(0.1)
        result["load_avg_1m"]["end"] = load_avg()
    finally:
        for p in procs:
            stop_region(p)

    out = Path(args.out) if args.out else ROOT / "bench" / "results" / ("router_smoke.json" if args.smoke
                                                                        else "router.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {out}")
    return 0


def print_table(r: dict) -> None:
    print(f"\nload average (1 min): {r['load_avg_1m']}")
    print(f"\n{'':38}{'direct p50':>11}{'router p50':>11}{'added p50':>10}{'pairs':>8}{'direct p99':>11}"
          f"{'router p99':>11}{'added p99':>10}")
    for key, label in (("latency_serve", "latency, Ray Serve region (headline)"),
                       ("ttft_serve", "first token, Ray Serve region"), ("latency_plain", "latency, plain endpoint")):
        x = r[key]
        print(f"{label:38}{x['direct_p50_ms']:>9.2f}ms{x['router_p50_ms']:>9.2f}ms{x['added_p50_ms']:>8.2f}ms"
              f"{x['added_median_of_pairs_ms']:>6.2f}ms{x['direct_p99_ms']:>9.2f}ms{x['router_p99_ms']:>9.2f}ms"
              f"{x['added_p99_ms']:>8.2f}ms")
    print("(pairs: the median of router minus direct over requests sent one after the other)")
    print(f"\n{'throughput (C clients, back to back)':38}{'direct req/s':>13}{'router req/s':>13}{'ratio':>7}")
    for key, label in (("throughput_serve", "Ray Serve region"), ("throughput_plain", "plain endpoint")):
        x = r[key]
        print(f"{label:38}{x['direct_requests_per_s']:>13.1f}{x['router_requests_per_s']:>13.1f}"
              f"{x['router_vs_direct']:>7.2f}")
    print(f"router CPU per request (plain endpoint runs): {r['router_cpu_ms_per_request']:.2f} ms")
    for i, f in enumerate(r["failover"]):
        print(f"\nregion loss {i + 1}: first request served elsewhere {f['time_to_first_served_elsewhere_ms']:.1f} ms "
              f"after the kill; {f['failed_requests']} failed; p50 after the loss "
              f"{f['latency_after_loss_p50_ms']:.1f} ms over {f['requests_after_loss']} requests")


if __name__ == "__main__":
    sys.exit(main())
