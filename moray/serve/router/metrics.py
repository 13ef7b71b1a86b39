"""The router's Prometheus metrics, per region (GET /metrics on the router).

    moray:router_requests_total{region, outcome}   attempts sent to a region, by how they ended:
                                                   ok, client_error (4xx, passed on), saturated (429),
                                                   failed (connection, 5xx, a cut stream)
    moray:router_failovers_total{region, kind}     requests that left `region` for another: retry
                                                   (non-streamed), restart (a stream before its first
                                                   event), resume (a stream mid-way), spill (429)
    moray:router_hedges_total{region}              second requests sent while the first was slow
    moray:router_upstream_latency_seconds{region}  histogram: request sent -> region's response
                                                   headers (the whole answer when not streamed)
    moray:router_breaker_state{region}             0 closed, 1 half-open, 2 open
    moray:router_region_latency_seconds{region}    probe round-trip EWMA
    moray:router_region_queue_depth{region}, moray:router_region_kv_usage{region},
    moray:router_region_in_flight{region}          what the policy sees, read at scrape time

Counters use a registry of the router's own (not the process-global one), so two routers
in one process (tests) keep their counts apart. Label children are bound once per region:
the request path pays a dict lookup, not a label resolution.
"""

from __future__ import annotations

from typing import Dict

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTCOMES = ("ok", "client_error", "saturated", "failed")
FAILOVERS = ("retry", "restart", "resume", "spill")
_LATENCY = [0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


class RouterMetrics:
    def __init__(self, regions: Dict[str, object]):
        self.regions = regions
        self.registry = CollectorRegistry(auto_describe=False)
        requests = Counter("moray:router_requests", "Attempts sent to a region, by outcome.",
                           ["region", "outcome"], registry=self.registry)
        failovers = Counter("moray:router_failovers", "Requests that left a region for another, by kind.",
                            ["region", "kind"], registry=self.registry)
        hedges = Counter("moray:router_hedges", "Hedged second requests sent.", ["region"], registry=self.registry)
        latency = Histogram("moray:router_upstream_latency_seconds", "Request sent -> response headers.",
                            ["region"], buckets=_LATENCY, registry=self.registry)
        self.requests = {(n, o): requests.labels(n, o) for n in regions for o in OUTCOMES}
        self.failovers = {(n, k): failovers.labels(n, k) for n in regions for k in FAILOVERS}
        self.hedges = {n: hedges.labels(n) for n in regions}
        self.latency = {n: latency.labels(n) for n in regions}
        self.registry.register(_RegionGauges(regions))

    def attempt(self, region: str, outcome: str, seconds: float = None) -> None:
        self.requests[region, outcome].inc()
        if seconds is not None:
            self.latency[region].observe(seconds)

    def failover(self, region: str, kind: str) -> None:
        self.failovers[region, kind].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RegionGauges:
    """Gauges read from the region table when scraped, so they are never stale."""

    def __init__(self, regions):
        self.regions = regions

    def collect(self):
        families = {
            "moray:router_breaker_state": ("Breaker: 0 closed, 1 half-open, 2 open.", lambda r: int(r.breaker.state)),
            "moray:router_region_latency_seconds": ("Probe round-trip EWMA.", lambda r: r.latency_s or 0.0),
            "moray:router_region_queue_depth": ("Sequences waiting in the region.", lambda r: r.queue_depth),
            "moray:router_region_kv_usage": ("The region's KV-cache use (0..1).", lambda r: r.kv_usage),
            "moray:router_region_in_flight": ("This router's requests open at the region.", lambda r: r.in_flight),
        }
        for name, (doc, value) in families.items():
            g = GaugeMetricFamily(name, doc, labels=["region"])
            for r in self.regions.values():
                g.add_metric([r.name], value(r))
            yield g
