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

The engine appends each latency it measures to a list in `EngineStats`; `absorb` moves
what is new into fixed-bucket histograms and empties those lists, so a server that
runs for weeks holds a few hundred counters, not every latency it ever saw. Gauges
are read when scraped rather than from the stats snapshot, which the engine refreshes
only when it steps: after the last request leaves (or is aborted) nothing steps, and a
snapshot would show the old KV usage forever.

One LLM server replica exports its own engine; the ingress's /metrics answers with the
replica it reaches, labelled by `replica` (scrape each replica, or sum in Prometheus).
"""

from __future__ import annotations

import bisect
import threading
from typing import Dict, List, Sequence

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


class _Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, values: Sequence[float]) -> None:
        for v in values:
            self.counts[bisect.bisect_left(self.bounds, v)] += 1
            self.sum += v

    def cumulative(self) -> List[tuple]:
        out, total = [], 0
        for bound, c in zip(self.bounds + [float("inf")], self.counts):
            total += c
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class EngineMetrics:
    def __init__(self, model_name: str, replica: str = ""):
        self.labels = {"model_name": model_name, **({"replica": replica} if replica else {})}
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

    def render(self, core) -> str:
        """The Prometheus text exposition of `core` (an EngineCore) now."""
        self.absorb(core.stats)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, core))
        return generate_latest(registry).decode("utf-8")


class _Collector:
    def __init__(self, metrics: EngineMetrics, core):
        self.m, self.core = metrics, core

    def collect(self):
        names, values = list(self.m.labels), list(self.m.labels.values())
        s, sched = self.core.stats, self.core.scheduler

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge("moray:num_requests_running", "Sequences in the engine's running batch.", sched.num_running)
        yield gauge("moray:num_requests_waiting", "Sequences waiting for the engine.", sched.num_waiting)
        yield gauge("moray:kv_cache_usage_perc", "Fraction of KV-cache blocks held by requests (1 = full).",
                    self.core.kv.usage)
        yield counter("moray:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("moray:prefix_cache_hits", "Prompt tokens the prefix cache served.", s.prefix_cache_hits)
        yield counter("moray:prompt_tokens", "Prompt tokens taken in.", s.prompt_tokens)
        yield counter("moray:generation_tokens", "Tokens generated.", s.generation_tokens)
        yield counter("moray:num_preemptions", "Sequences preempted (KV cache full).", s.num_preemptions)
        yield counter("moray:spec_decode_num_drafts", "Speculative verification steps.", s.spec.steps)
        yield counter("moray:spec_decode_num_draft_tokens", "Draft tokens proposed.", s.spec.drafted)
        yield counter("moray:spec_decode_num_accepted_tokens", "Draft tokens accepted.", s.spec.accepted)
        success = CounterMetricFamily("moray:request_success", "Requests finished, by finish reason.",
                                      labels=names + ["finished_reason"])
        with self.m._lock:
            finished = dict(self.m.finished)
            hists = {n: (h.cumulative(), h.sum) for n, h in self.m.histograms.items()}
        for reason, n in sorted(finished.items()):
            success.add_metric(values + [reason], n)
        yield success
        for name, (buckets, total) in hists.items():
            h = HistogramMetricFamily(name, HISTOGRAMS[name][2], labels=names)
            h.add_metric(values, buckets, total)
            yield h
