"""One stage-to-stage hop of a (T, D) activation between two Ray actors, two ways, side by side:

- gloo: the actors join a torch.distributed gloo group (what the stage gang uses today) and
  ping-pong the tensor with send/recv; a hop is half a round trip, timed inside the actors.
- compiled graph: a Ray Compiled Graph (`ray.dag`, shared-memory channels on the CPU) whose
  nodes alternate between the two actors, each passing the tensor on. A hop is the slope of the
  time per execution against the number of hops (chains of 1 and 9 hops): what one more stage
  costs, the driver's own cost per execution taken out ("chain" beside it: the 9-hop chain's
  time per hop, an upper bound that the load's noise cannot turn negative). Two channel types:
  Ray's default (the value pickled into the shared-memory channel) and
  `with_tensor_transport("shm")` (the torch tensor transport over host memory).

Every way runs at one size before the next size, `rounds` times, and each figure is the median:
the machine is shared and its load drifts. Last, what waiting costs: the CPU that two idle
actors use, plain and inside a compiled graph (whose channel readers poll).

Run by bench/serve_stages.py (recorded in bench/results/serve_stages.json); alone:

    python bench/serve_hops.py            # the sizes below, 200 gloo hops, 40 graph executions each
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

# (tokens, label): a decode step's batch at 1, 16 and 64 sequences, and a 512-token prefill chunk.
SIZES = [(1, "decode B1"), (16, "decode B16"), (64, "decode B64"), (512, "prefill 512")]
D_MODELS = (256, 1024)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Channels sized for the largest message (a 2 MiB prefill chunk), so none has to grow mid-run.
BUFFER_BYTES = 4 << 20


class HopActor:
    """One end of the hop. Plain Python (ray.remote wraps it), one torch thread: a stage rank's."""

    def __init__(self):
        torch.set_num_threads(1)

    def pid(self) -> int:
        return os.getpid()

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def join(self, addr: str, port: int, rank: int) -> int:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=2)
        return rank

    def pingpong(self, tokens: int, d: int, dtype: str, hops: int, warmup: int = 10) -> Optional[float]:
        """Rank 0 sends, rank 1 sends back, `hops` times in all; rank 0's seconds per hop."""
        import torch.distributed as dist

        rank = dist.get_rank()
        x = torch.ones(tokens, d, dtype=DTYPES[dtype])
        buf = torch.empty_like(x)
        t0 = 0.0
        for i in range(warmup + hops // 2):
            if i == warmup:
                t0 = time.perf_counter()
            if rank == 0:
                dist.send(x, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
        return (time.perf_counter() - t0) / (2 * (hops // 2)) if rank == 0 else None

    def leave(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()

    # ------------------------------------------------------------ compiled graph nodes

    def make(self, spec) -> torch.Tensor:
        tokens, d, dtype = spec
        return torch.ones(tokens, d, dtype=DTYPES[dtype])

    def relay(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def sink(self, x: torch.Tensor) -> int:
        return x.shape[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _chain(a, b, hops: int, transport: Optional[str]):
    """a.make -> (b, a, b, ...).relay x (hops - 1) -> sink on whichever actor is next: `hops` hops."""
    from ray.dag import InputNode

    actors = [a, b]
    with InputNode() as inp:
        x = a.make.bind(inp)
        for h in range(hops):
            if transport:
                x = x.with_tensor_transport(transport)
            nxt = actors[(h + 1) % 2]
            x = nxt.sink.bind(x) if h == hops - 1 else nxt.relay.bind(x)
    return x.experimental_compile(_buffer_size_bytes=BUFFER_BYTES)


def _cpu_seconds(pids: List[int]) -> float:
    """User + system CPU seconds the processes have used (Linux /proc)."""
    total = 0.0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def idle_cpu(pids: List[int], seconds: float = 3.0) -> float:
    """CPU seconds per second that idle processes use while waiting for work."""
    c0 = _cpu_seconds(pids)
    time.sleep(seconds)
    return (_cpu_seconds(pids) - c0) / seconds


def _time_dag(dag, spec, n: int, warmup: int = 5) -> float:
    import ray

    for _ in range(warmup):
        ray.get(dag.execute(spec))
    t0 = time.perf_counter()
    for _ in range(n):
        ray.get(dag.execute(spec))
    return (time.perf_counter() - t0) / n


def measure_hops(hops: int = 200, sizes=SIZES, d_models=D_MODELS, dtypes=tuple(DTYPES), long_chain: int = 9,
                 rounds: int = 5, executions: int = 40) -> Dict:
    """Every (size, d_model, dtype) through gloo and through compiled graphs; ms per hop and the
    compiled graph's time over gloo's. Interleaved: each round times every way at one size before
    the next size, and each figure is the median of `rounds`, so the machine's load (shared, and
    changing) weighs on all ways alike. Needs ray.init() done."""
    import ray
    import ray.cloudpickle

    if __name__ != "__main__":  # imported from bench/, which Ray's workers cannot import: ship it by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cls = ray.remote(num_cpus=0)(HopActor)  # idle ones sleep in a read: only the timed pair computes
    pair = [cls.remote(), cls.remote()]
    addr, port = ray.get(pair[0].node_ip.remote()), _free_port()
    ray.get([pair[0].join.remote(addr, port, 0), pair[1].join.remote(addr, port, 1)])
    # Compiled graphs: one per chain length and channel type, each on a pair of its own (an actor
    # runs one compiled graph at a time).
    graphs, errors, actors, pids = {}, {}, list(pair), {}
    for kind, transport in (("cgraph", None), ("cgraph_tensor_shm", "shm")):
        try:
            for chain in (1, long_chain):
                a, b = cls.remote(), cls.remote()
                actors += [a, b]
                pids[kind, chain] = ray.get([a.pid.remote(), b.pid.remote()])
                graphs[kind, chain] = _chain(a, b, chain, transport)
        except Exception as e:  # noqa: BLE001 - recorded as it is: the decision needs the error
            errors[kind] = f"{type(e).__name__}: {e}"
    kinds = [k for k in ("cgraph", "cgraph_tensor_shm") if k not in errors]
    # What waiting costs: two actors with nothing to do, plain (the gloo pair) and inside a compiled
    # graph that has run once (its loops wait on their channels).
    idle = {"plain_actors": idle_cpu(ray.get([p.pid.remote() for p in pair]))}
    for k in kinds:
        _time_dag(graphs[k, 1], (1, 256, "float32"), 1, warmup=1)
        idle[f"{k}_actors"] = idle_cpu(pids[k, 1])
    execs = executions
    rows: List[Dict] = []
    try:
        for tokens, label in sizes:
            for d in d_models:
                for dtype in dtypes:
                    spec = (tokens, d, dtype)
                    seen = {"gloo": [], **{(k, c): [] for k in kinds for c in (1, long_chain)}}
                    for _ in range(rounds):
                        seen["gloo"].append(ray.get([p.pingpong.remote(tokens, d, dtype, hops) for p in pair])[0])
                        for k in kinds:
                            for c in (1, long_chain):
                                seen[k, c].append(_time_dag(graphs[k, c], spec, execs))
                    med = {key: statistics.median(v) for key, v in seen.items()}
                    row = {"what": label, "tokens": tokens, "d_model": d, "dtype": dtype,
                           "bytes": tokens * d * torch.empty((), dtype=DTYPES[dtype]).element_size(),
                           "gloo_ms": 1e3 * med["gloo"]}
                    for k in kinds:
                        one, many = med[k, 1], med[k, long_chain]
                        row[f"{k}_ms"] = 1e3 * (many - one) / (long_chain - 1)
                        # An upper bound, never below zero when the slope drowns in the load's noise:
                        # the long chain's time per hop, the driver's write and read included.
                        row[f"{k}_chain_ms"] = 1e3 * many / long_chain
                        row[f"{k}_exec_1hop_ms"] = 1e3 * one
                        row[f"{k}_over_gloo"] = row[f"{k}_ms"] / row["gloo_ms"]
                    rows.append(row)
    finally:
        # Actors first, then teardown(): in Ray 2.60 teardown() of a graph that has carried ~1 MB
        # messages hangs, its reader blocked in Channel.read (seen here every time, both channel
        # types); with the actors dead it returns at once.
        for h in actors:
            ray.kill(h)
        for g in graphs.values():
            g.teardown()
    return {"rows": rows, "errors": errors, "idle_cpu_s_per_s_two_actors": idle, "hops_timed": hops,
            "chain": [1, long_chain],
            "executions_per_chain": execs, "rounds": rounds}


def print_hops(res: Dict) -> None:
    print(f"{'hop':<13}{'D':>6}{'dtype':>10}{'KiB':>8}{'gloo ms':>9}{'cgraph ms':>11}{'chain':>7}{'x gloo':>8}"
          f"{'cg-shm ms':>11}{'chain':>7}{'x gloo':>8}")
    for r in res["rows"]:
        def cell(k, fmt):
            return format(r[k], fmt) if r.get(k) is not None else "-"
        print(f"{r['what']:<13}{r['d_model']:>6}{r['dtype']:>10}{r['bytes'] / 1024:>8.1f}{r['gloo_ms']:>9.3f}"
              f"{cell('cgraph_ms', '.3f'):>11}{cell('cgraph_chain_ms', '.2f'):>7}{cell('cgraph_over_gloo', '.2f'):>8}"
              f"{cell('cgraph_tensor_shm_ms', '.3f'):>11}{cell('cgraph_tensor_shm_chain_ms', '.2f'):>7}"
              f"{cell('cgraph_tensor_shm_over_gloo', '.2f'):>8}")
    for k, e in res["errors"].items():
        print(f"{k} failed: {e}")
    print("idle, CPU seconds per second of two waiting actors: " + ", ".join(
        f"{k} {v:.3f}" for k, v in res["idle_cpu_s_per_s_two_actors"].items()))


if __name__ == "__main__":
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        print_hops(measure_hops())
    finally:
        ray.shutdown()
    sys.exit(0)
