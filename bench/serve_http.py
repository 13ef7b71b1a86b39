"""What the HTTP and Ray Serve layers cost: the same engine called in process, through our
FastAPI app (uvicorn, no Ray), through the Ray Serve app (ingress -> LLM server replica ->
engine) with each of Serve's HTTP fronts (its Python proxy; HAProxy, what jobs/serve.py
starts: moray/serve/cluster_env.py), and vLLM's own OpenAI server, on the same weights and
load, in one run.

Two loads per system, greedy, fixed prompt and output lengths (ignore_eos):
  sequential  one streamed request at a time: time to first token (TTFT: the first event
              that carries a token), end to end, time per output token after the first;
  concurrent  C clients, each sending R non-streamed requests back to back: requests/s,
              output tokens/s, latency.
The overhead of a layer is its TTFT minus the in-process engine's (ms) and the ratio of
the two; Ray Serve LLM is reported ~20 ms slower to first token than bare vLLM (ray
issue 59681), the bar to be well under.

All servers are up at once, each in its own process(es) with one torch thread; the
sequential requests go round the systems in turn, so a shared machine's drifting load
falls on all alike, and each concurrent load runs while the others idle. The client is
this process (httpx, SSE read line by line; the same client for every HTTP system). The model is random (d 128, 4 layers, 4 experts top-2) with a
word-level tokenizer.json (one word per id), so every token decodes to whole text and
no server holds a partial character back: a token is an event for every system.

    python bench/serve_http.py               # a few minutes on 2 shared cores
    python bench/serve_http.py --smoke       # the plumbing, small counts, no vLLM
    python bench/serve_http.py --no-vllm --no-ray
    python bench/serve_http.py --ingress haproxy   # one Serve front only (default: both)

Writes bench/results/serve_http.json (--smoke: serve_http_smoke.json); a table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODEL = dict(vocab_size=320, d_model=128, n_layers=4, n_heads=4, n_kv_heads=1, ffn_hidden=256, mlp="swiglu",
             n_experts=4, top_k=2, max_seq_len=256, init_std=0.02)
NAME = "bench"
SERVE_SYSTEMS = {"proxy": "ray_serve", "haproxy": "ray_serve_haproxy"}  # Serve's HTTP front -> system name
SPECIALS = ["<unk>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_model(path: Path) -> Path:
    """A Hugging Face Mixtral directory with a word-level tokenizer: what both servers load."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from moray.model import ModelConfig, build_model
    from moray.model.hf import save_hf_dir

    cfg = ModelConfig(**MODEL)
    save_hf_dir(path, cfg, build_model(cfg, seed=0).state_dict(), overwrite=True)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), cfg.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>", "unk_token": "<unk>",
        "model_max_length": cfg.max_seq_len}))
    return path


def serve_cfg(args):
    from moray.platform.config import ServeConfig

    return ServeConfig(model_name=NAME, dtype="float32", max_num_seqs=max(8, args.clients), kv_cache_memory_mb=64,
                       max_batch_tokens=1024)


def prompts(n: int, length: int, seed: int) -> List[List[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(len(SPECIALS), MODEL["vocab_size"]) for _ in range(length)] for _ in range(n)]


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarise(seq: List[dict], conc: List[dict], conc_wall: float, new_tokens: int) -> dict:
    ttft = [r["ttft"] for r in seq]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in seq if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in conc)
    return {"ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_mean_ms": 1e3 * statistics.mean(ttft),
            "ttft_p90_ms": 1e3 * pct(ttft, 90), "e2e_p50_ms": 1e3 * pct([r["e2e"] for r in seq], 50),
            "tpot_p50_ms": 1e3 * pct(tpot, 50), "tokens_per_request": statistics.mean(r["tokens"] for r in seq),
            "concurrent_requests_per_s": len(conc) / conc_wall, "concurrent_tokens_per_s": tokens / conc_wall,
            "concurrent_latency_p50_ms": 1e3 * pct([r["e2e"] for r in conc], 50),
            "complete": all(r["tokens"] == new_tokens for r in seq + conc)}


# ---------------------------------------------------------------- the systems


class Engine:
    """The engine called in process: AsyncLLMEngine.generate, no HTTP, no Ray."""

    name = "engine"

    def __init__(self, model_dir: Path, args):
        from moray.serve.engine import SamplingParams
        from moray.serve.engine.llm import AsyncLLMEngine
        from moray.serve.server import engine_overrides

        self.engine = AsyncLLMEngine.from_path(str(model_dir), **engine_overrides(serve_cfg(args)))
        self.params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        self.ids = iter(range(10 ** 9))

    async def stream(self, ids):
        t0, first, n = time.perf_counter(), None, 0
        async for out in self.engine.generate(f"b{next(self.ids)}", ids, self.params):
            n = len(out.token_ids)
            first = first or time.perf_counter()
        return {"ttft": first - t0, "e2e": time.perf_counter() - t0, "tokens": n}

    request = stream

    def stop(self):
        self.engine.shutdown()


class HTTP:
    """An OpenAI server at `base`: completions with token-id prompts, streamed or whole. TTFT is
    the first event that carries text; the token count is the usage the server reports."""

    def __init__(self, name: str, base: str, args, stop=lambda: None, startup_s: float = 0.0):
        self.name, self.base, self.args, self._stop, self.startup_s = name, base, args, stop, startup_s
        self.http = None

    def _body(self, ids, stream):
        body = {"model": NAME, "prompt": ids, "max_tokens": self.args.new_tokens, "temperature": 0,
                "stream": stream, "ignore_eos": True}
        return {**body, "stream_options": {"include_usage": True}} if stream else body

    def _client(self):
        import httpx

        if self.http is None:  # made inside the event loop that uses it
            self.http = httpx.AsyncClient(base_url=self.base, timeout=300, limits=httpx.Limits(
                max_connections=self.args.clients + 2, max_keepalive_connections=self.args.clients + 2))
        return self.http

    async def stream(self, ids):
        t0, first, n = time.perf_counter(), None, 0
        async with self._client().stream("POST", "/v1/completions", json=self._body(ids, True)) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0].get("text"):
                    first = first or time.perf_counter()
                if event.get("usage"):
                    n = event["usage"]["completion_tokens"]
        return {"ttft": first - t0, "e2e": time.perf_counter() - t0, "tokens": n}

    async def request(self, ids):
        t0 = time.perf_counter()
        r = await self._client().post("/v1/completions", json=self._body(ids, False))
        r.raise_for_status()
        return {"e2e": time.perf_counter() - t0, "tokens": r.json()["usage"]["completion_tokens"]}

    def stop(self):
        self._stop()


def wait_ready(base: str, proc=None, timeout: float = 600) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} not ready after {timeout:.0f} s")


def _descendants(pid: int) -> List[int]:
    """Every process below pid now (a Ray cluster's raylet, GCS, workers, HAProxy), from /proc."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def start_subprocess(name: str, cmd: List[str], args, env=None, log: Path = None, port: int = 0) -> HTTP:
    base = f"http://127.0.0.1:{port}"
    lf = open(log or os.devnull, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        # Ctrl-C first: `serve run` then shuts Serve down, HAProxy included (HAProxy runs in a
        # session of its own, out of reach of killpg, and outlives a SIGTERM'd `serve run`).
        # Whatever is left afterwards, of what it had started, is killed.
        started = _descendants(proc.pid)
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for pid in [proc.pid] + started:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait()
        lf.close()

    t0 = time.perf_counter()
    try:
        wait_ready(base, proc, args.server_timeout)
    except BaseException:
        stop()
        raise
    return HTTP(name, base, args, stop, time.perf_counter() - t0)


def start_plain_http(model_dir: Path, args) -> HTTP:
    port = free_port()
    cmd = [sys.executable, __file__, "--plain-server", str(port), "--model-dir", str(model_dir),
           "--clients", str(args.clients)]
    return start_subprocess("http", cmd, args, dict(os.environ, OMP_NUM_THREADS="1"), port=port)


def plain_server(port: int, model_dir: str, args) -> None:
    """Our FastAPI app on uvicorn over an LLMServer in this process (no Ray)."""
    import torch
    import uvicorn

    from moray.serve.openai.api import build_api
    from moray.serve.openai.auth import APIKeys
    from moray.serve.server import LLMServer

    torch.set_num_threads(1)
    cfg = serve_cfg(args)
    server = LLMServer.from_path(model_dir, cfg)
    uvicorn.run(build_api(server, cfg, keys=APIKeys([])), host="127.0.0.1", port=port, log_level="warning")


def start_ray_serve(model_dir: Path, args, ingress: str = "proxy") -> HTTP:
    """`serve run` of a Serve config file (as configs/serve-tiny.yaml), a local Ray cluster of its own
    whose HTTP front is `ingress` ("proxy": Serve's Python proxy; "haproxy")."""
    import yaml

    from moray.serve.cluster_env import serve_env

    cfg = serve_cfg(args)
    port = free_port()
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "moray", "route_prefix": "/", "import_path": "moray.serve.app:build_app",
                                "args": {"checkpoint": str(model_dir), "overrides": [
                                    f"serve.model_name={NAME}", "serve.dtype=float32",
                                    f"serve.max_num_seqs={cfg.max_num_seqs}", "serve.kv_cache_memory_mb=64",
                                    "serve.max_batch_tokens=1024", "serve.replica_cpus=1"]}}]}
    path = ROOT / "runs" / "bench_serve" / "http" / f"serve_{ingress}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [str(Path(sys.executable).with_name("serve")), "run", "--address", "local", str(path)]
    log = ROOT / "runs" / "bench_serve" / "http" / f"serve_run_{ingress}.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **serve_env(ingress))
    return start_subprocess(SERVE_SYSTEMS[ingress], cmd, args, env, log, port)


def start_vllm(model_dir: Path, args):
    import vllm_install

    status = vllm_install.ensure_vllm(allow_install=not args.no_install)
    if not status.get("ok"):
        return {"skipped": status.get("reason")}
    port = free_port()
    cmd = [status["python"], "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(MODEL["max_seq_len"]), "--max-num-seqs", str(serve_cfg(args).max_num_seqs),
           "--seed", "0", "--disable-uvicorn-access-log"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="0",
               VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1")
    log = ROOT / "bench" / "results" / "serve_http_vllm.log"
    try:
        return start_subprocess("vllm_http", cmd, args, env, log, port)
    except Exception as err:  # noqa: BLE001 - recorded, the other columns stand
        return {"skipped": f"{type(err).__name__}: {err} (see {log.relative_to(ROOT)})"}


# ---------------------------------------------------------------- the loads


async def measure(systems: List, args, log) -> Dict[str, dict]:
    """Sequential streams interleaved over the systems (one request each per round, the order
    rotating), so load that drifts on a shared machine falls on all of them alike; then each
    system's concurrent load on its own, the others idle."""
    for s in systems:
        for ids in prompts(args.warmup, args.prompt_len, 999):
            await s.stream(ids)
    seq = {s.name: [] for s in systems}
    for i, ids in enumerate(prompts(args.sequential, args.prompt_len, 1)):
        for s in systems[i % len(systems):] + systems[:i % len(systems)]:
            seq[s.name].append(await s.stream(ids))
    out = {}
    batches = [prompts(args.requests_per_client, args.prompt_len, 100 + c) for c in range(args.clients)]
    for s in systems:
        async def client(ps, s=s):
            return [await s.request(ids) for ids in ps]

        t0 = time.perf_counter()
        conc = [r for rs in await asyncio.gather(*(client(ps) for ps in batches)) for r in rs]
        out[s.name] = summarise(seq[s.name], conc, time.perf_counter() - t0, args.new_tokens)
        if getattr(s, "startup_s", None):
            out[s.name]["startup_s"] = s.startup_s
        log(f"{s.name}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in out[s.name].items()))
    return out


# ---------------------------------------------------------------- the report


def overheads(results: Dict[str, dict]) -> Dict[str, dict]:
    base = results["engine"]
    out = {}
    for name in ("http", "ray_serve", "ray_serve_haproxy", "vllm_http"):
        r = results.get(name, {})
        if "ttft_p50_ms" not in r:
            continue
        out[name] = {"ttft_p50_extra_ms": r["ttft_p50_ms"] - base["ttft_p50_ms"],
                     "ttft_p50_ratio": r["ttft_p50_ms"] / base["ttft_p50_ms"],
                     "tpot_p50_extra_ms": r["tpot_p50_ms"] - base["tpot_p50_ms"],
                     "concurrent_tokens_per_s_ratio": r["concurrent_tokens_per_s"] / base["concurrent_tokens_per_s"]}
    for name in SERVE_SYSTEMS.values():
        for other in ("http", "vllm_http"):  # the Serve layers alone; the bar of ray issue 59681
            if "ttft_p50_ms" in results.get(name, {}) and "ttft_p50_ms" in results.get(other, {}):
                out[f"{name}_vs_{other}"] = {
                    "ttft_p50_extra_ms": results[name]["ttft_p50_ms"] - results[other]["ttft_p50_ms"]}
    return out


def print_table(r: dict, out: Path) -> None:
    a = r["args"]
    print(f"\n{a['prompt_len']} prompt + {a['new_tokens']} new tokens, greedy; sequential: {a['sequential']} streamed "
          f"requests; concurrent: {a['clients']} clients x {a['requests_per_client']} requests; load avg "
          f"{r['load_avg_1m']:.1f} on {os.cpu_count()} cores")
    print(f"{'system':>24} {'TTFT p50':>9} {'p90':>7} {'TPOT p50':>9} {'e2e p50':>8} {'conc req/s':>11} "
          f"{'conc tok/s':>11} {'+TTFT ms':>9} {'xTTFT':>6}")
    labels = {"engine": "engine in process", "http": "HTTP (FastAPI, no Ray)", "ray_serve": "Serve app, Serve proxy",
              "ray_serve_haproxy": "Serve app, HAProxy", "vllm_http": "vLLM OpenAI server"}
    for key, label in labels.items():
        s = r["systems"].get(key, {})
        if "ttft_p50_ms" not in s:
            if s:
                print(f"{label:>24}  skipped: {s.get('skipped')}")
            continue
        o = r["overhead"].get(key, {})
        extra = f"{o['ttft_p50_extra_ms']:>9.1f} {o['ttft_p50_ratio']:>6.2f}" if o else f"{'-':>9} {'-':>6}"
        print(f"{label:>24} {s['ttft_p50_ms']:>9.1f} {s['ttft_p90_ms']:>7.1f} {s['tpot_p50_ms']:>9.2f} "
              f"{s['e2e_p50_ms']:>8.1f} {s['concurrent_requests_per_s']:>11.2f} {s['concurrent_tokens_per_s']:>11.0f} "
              f"{extra}")
    for name in SERVE_SYSTEMS.values():
        o = r["overhead"]
        if f"{name}_vs_http" in o:
            print(f"{labels[name]} vs our FastAPI app (the Serve layers), TTFT p50: "
                  f"{o[f'{name}_vs_http']['ttft_p50_extra_ms']:+.1f} ms")
        if f"{name}_vs_vllm_http" in o:
            print(f"{labels[name]} vs vLLM's server, TTFT p50: "
                  f"{o[f'{name}_vs_vllm_http']['ttft_p50_extra_ms']:+.1f} ms "
                  f"(Ray Serve LLM vs bare vLLM, ray issue 59681: ~+20 ms)")
    print(f"(ms; 'x' = over the engine in process)\nwrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small counts, no vLLM: the plumbing")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--sequential", type=int, default=30)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--ingress", choices=["both", *SERVE_SYSTEMS], default="both",
                    help="the Serve app's HTTP front(s) to measure (default both)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-install", action="store_true", help="use bench/.venv-vllm only if it is there")
    ap.add_argument("--server-timeout", type=float, default=600)
    ap.add_argument("--out")
    ap.add_argument("--plain-server", type=int, help=argparse.SUPPRESS)  # internal: serve the app on this port
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_server:
        return plain_server(args.plain_server, args.model_dir, args)
    if args.smoke:
        args.sequential, args.clients, args.requests_per_client, args.warmup = 5, 2, 2, 1
        args.new_tokens, args.no_vllm = 8, True

    import torch

    torch.set_num_threads(1)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    model_dir = save_model(ROOT / "runs" / "bench_serve" / "http" / "hf")
    systems, skipped = [], {}
    fronts = [] if args.no_ray else list(SERVE_SYSTEMS) if args.ingress == "both" else [args.ingress]
    starters = [("http", start_plain_http)] + \
        [(SERVE_SYSTEMS[f], lambda d, a, f=f: start_ray_serve(d, a, f)) for f in fronts] + \
        ([] if args.no_vllm else [("vllm_http", start_vllm)])
    try:
        systems.append(Engine(model_dir, args))
        for name, start in starters:
            log(f"starting {name} ...")
            got = start(model_dir, args)
            if isinstance(got, dict):
                skipped[name] = got
                log(f"{name} skipped: {got['skipped']}")
            else:
                systems.append(got)
                log(f"{name} up in {got.startup_s:.0f} s")
        results = asyncio.run(measure(systems, args, log))
    finally:
        for s in systems:
            s.stop()
    results.update(skipped)
    result = {"args": vars(args), "model": MODEL, "load_avg_1m": os.getloadavg()[0], "systems": results,
              "overhead": overheads(results), "wall_s": time.perf_counter() - t_start}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "serve_http_smoke.json" if args.smoke else "serve_http.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, out)


if __name__ == "__main__":
    main()
