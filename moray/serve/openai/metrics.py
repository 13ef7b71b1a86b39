"""Prometheus metrics with vLLM's names under `moray:`, so a vLLM Grafana dashboard works
after replacing `vllm:` by `moray:`.

    moray:num_requests_running / _waiting      gauges, read live from the scheduler
    moray:kv_cache_usage_perc                  gauge in [0, 1], live from the KV cache manager
    moray:prefix_cache_queries_total / _hits_total, moray:prompt_tokens_total,
    moray:generation_tokens_total, moray:num_preemptions_total
    moray:request_success_total{finished_reason}
    moray:spec_decode_num_drafts_total / _num_draft_tokens_total / _num_accepted_tokens_total
    moray:time_to_first_token_seconds, moray:inter_token_latency_seconds,
    moray:e2e_request_latency_seconds, moray:request_queue_time_seconds   histograms
    moray:server_replicas                      gauge: LLM server replicas in this answer

One LLM server replica takes a `snapshot` of its engine (plain data, so it crosses Ray);
`render(snapshots)` writes the Prometheus text of any number of them: the whole app's
counters and histograms summed over replicas (a dashboard's rate() and quantiles are the
app's), its gauges one sample per replica, labelled `replica` (a dashboard sums or averages
them as it sees fit). Through Ray Serve the ingress asks every replica (moray/serve/app.py);
`ReplicaTotals` there keeps the last numbers of a replica that went away, so a sum never
goes down (Prometheus would read a drop as a counter reset).

The engine appends each latency it measures to a list in `EngineStats`; `absorb` moves
what is new into fixed-bucket histograms and empties those lists, so a server that runs
for weeks holds a few hundred counters, not every latency it ever saw. Gauges are read
when scraped rather than from the stats snapshot, which the engine refreshes only when it
steps: after the last request leaves (or is aborted) nothing steps, and a snapshot would
show the old KV usage forever.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Dict, Iterable, List, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (vllm/v1/metrics/loggers.py), in seconds.
_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
         80.0, 160.0, 640.0, 2560.0]
_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_E2E = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
        960.0, 1920.0, 7680.0]

# histogram name -> (EngineStats list it drains, buckets, help)
HISTOGRAMS = {
    "moray:time_to_first_token_seconds": ("time_to_first_token_s", _TTFT, "Time from arrival to the first token."),
    "moray:inter_token_latency_seconds": ("inter_token_latency_s", _ITL, "Time between two tokens of a request."),
    "moray:e2e_request_latency_seconds": ("e2e_latency_s", _E2E, "Time from arrival to the last token."),
    "moray:request_queue_time_seconds": ("queue_time_s", _E2E, "Time a request waited before it first ran."),
}
# gauge name -> (help, read from an EngineCore now)
GAUGES = {
    "moray:num_requests_running": ("Sequences in the engine's running batch.", lambda c: c.scheduler.num_running),
    "moray:num_requests_waiting": ("Sequences waiting for the engine.", lambda c: c.scheduler.num_waiting),
    "moray:kv_cache_usage_perc": ("Fraction of KV-cache blocks held by requests (1 = full).", lambda c: c.kv.usage),
}
# counter name (without _total) -> (help, read from EngineStats)
COUNTERS = {
    "moray:prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", lambda s: s.prefix_cache_queries),
    "moray:prefix_cache_hits": ("Prompt tokens the prefix cache served.", lambda s: s.prefix_cache_hits),
    "moray:prompt_tokens": ("Prompt tokens taken in.", lambda s: s.prompt_tokens),
    "moray:generation_tokens": ("Tokens generated.", lambda s: s.generation_tokens),
    "moray:num_preemptions": ("Sequences preempted (KV cache full).", lambda s: s.num_preemptions),
    "moray:spec_decode_num_drafts": ("Speculative verification steps.", lambda s: s.spec.steps),
    "moray:spec_decode_num_draft_tokens": ("Draft tokens proposed.", lambda s: s.spec.drafted),
    "moray:spec_decode_num_accepted_tokens": ("Draft tokens accepted.", lambda s: s.spec.accepted),
}
SUCCESS = "moray:request_success"


class _Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, values: Sequence[float]) -> None:
        for v in values:
            self.counts[bisect.bisect_left(self.bounds, v)] += 1
            self.sum += v


class EngineMetrics:
    """One replica's metrics: the histograms and finish counts the engine's stats don't keep."""

    def __init__(self, model_name: str, replica: str = ""):
        self.model_name, self.replica = model_name, replica
        self.histograms = {name: _Histogram(b) for name, (_, b, _) in HISTOGRAMS.items()}
        self.finished: Dict[str, int] = {}
        self._lock = threading.Lock()

    def absorb(self, stats) -> None:
        """Move the engine's new latencies into the histograms (the engine thread only appends)."""
        with self._lock:
            for name, (attr, _, _) in HISTOGRAMS.items():
                values = getattr(stats, attr)
                taken = values[:len(values)]
                del values[:len(taken)]
                self.histograms[name].observe(taken)

    def record_finish(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def snapshot(self, core) -> dict:
        """Everything a scrape shows of `core` (an EngineCore) now, as plain data."""
        self.absorb(core.stats)
        with self._lock:
            return {"model_name": self.model_name, "replica": self.replica,
                    "gauges": {name: float(read(core)) for name, (_, read) in GAUGES.items()},
                    "counters": {name: float(read(core.stats)) for name, (_, read) in COUNTERS.items()},
                    "finished": dict(self.finished),
                    "histograms": {name: (list(h.counts), h.sum) for name, h in self.histograms.items()}}

    def render(self, core) -> str:
        return render([self.snapshot(core)])


class ReplicaTotals:
    """The last snapshot of every replica seen, for the counters and histograms: a replica that
    stops answering (replaced, scaled down) keeps its last numbers in the sums, so they never go
    down; a replica that answers again replaces its own. One silent for `forget_after_s` is folded
    into a single retired entry, so the map stays as small as the live replica set."""

    RETIRED = "retired"

    def __init__(self, forget_after_s: float = 3600.0):
        self.forget_after_s = forget_after_s
        self.last: Dict[str, dict] = {}  # replica -> its last snapshot
        self.seen_at: Dict[str, float] = {}  # replica -> when it last answered (monotonic)

    def update(self, live: Iterable[dict], now: float = None) -> List[dict]:
        """The snapshots to sum: the live ones and the last of each replica gone."""
        now = time.monotonic() if now is None else now
        for snap in live:
            self.last[snap["replica"]], self.seen_at[snap["replica"]] = snap, now
        for replica in [r for r, t in self.seen_at.items() if r != self.RETIRED and now - t > self.forget_after_s]:
            gone = self.last.pop(replica)
            del self.seen_at[replica]
            old = self.last.get(self.RETIRED)
            self.last[self.RETIRED] = _add(old, gone) if old else {**gone, "replica": self.RETIRED}
            self.seen_at[self.RETIRED] = now
        return list(self.last.values())


def _add(a: dict, b: dict) -> dict:
    """Counters and histograms of two snapshots added (a's gauges and labels kept)."""
    out = {**a, "counters": {k: a["counters"].get(k, 0.0) + b["counters"].get(k, 0.0)
                             for k in set(a["counters"]) | set(b["counters"])},
           "finished": {k: a["finished"].get(k, 0) + b["finished"].get(k, 0)
                        for k in set(a["finished"]) | set(b["finished"])}}
    out["histograms"] = {}
    for name in set(a["histograms"]) | set(b["histograms"]):
        (ca, sa), (cb, sb) = a["histograms"].get(name, ([], 0.0)), b["histograms"].get(name, ([], 0.0))
        width = max(len(ca), len(cb))
        ca, cb = ca + [0] * (width - len(ca)), cb + [0] * (width - len(cb))
        out["histograms"][name] = ([x + y for x, y in zip(ca, cb)], sa + sb)
    return out


def render(snapshots: Sequence[dict], live: Sequence[dict] = None) -> str:
    """The Prometheus text of `snapshots` summed (counters, histograms), with the gauges of
    `live` (default: the same snapshots) one sample per replica."""
    snapshots = list(snapshots)
    live = snapshots if live is None else list(live)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshots, live))
    return generate_latest(registry).decode("utf-8")


class _Collector:
    def __init__(self, snapshots: List[dict], live: List[dict]):
        self.snapshots, self.live = snapshots, live

    def collect(self):
        model = next((s["model_name"] for s in self.snapshots + self.live), "")
        total = None
        for s in self.snapshots:
            total = _add(total, s) if total else s
        per_replica = any(s["replica"] for s in self.live)  # through Serve; in one process, no label
        for name, (doc, _) in GAUGES.items():
            g = GaugeMetricFamily(name, doc, labels=["model_name", "replica"] if per_replica else ["model_name"])
            for s in self.live:
                g.add_metric([model, s["replica"]] if per_replica else [model], s["gauges"].get(name, 0.0))
            yield g
        replicas = GaugeMetricFamily("moray:server_replicas", "LLM server replicas that answered this scrape.",
                                     labels=["model_name"])
        replicas.add_metric([model], len(self.live))
        yield replicas
        if total is None:
            return
        for name, (doc, _) in COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([model], total["counters"].get(name, 0.0))
            yield c
        success = CounterMetricFamily(SUCCESS, "Requests finished, by finish reason.",
                                      labels=["model_name", "finished_reason"])
        for reason, n in sorted(total["finished"].items()):
            success.add_metric([model, reason], n)
        yield success
        for name, (_, bounds, doc) in HISTOGRAMS.items():
            counts, total_sum = total["histograms"].get(name, ([0] * (len(bounds) + 1), 0.0))
            h = HistogramMetricFamily(name, doc, labels=["model_name"])
            h.add_metric([model], _cumulative(bounds, counts), total_sum)
            yield h


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> List[tuple]:
    out, running = [], 0
    for bound, c in zip(list(bounds) + [float("inf")], counts):
        running += c
        out.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return out
