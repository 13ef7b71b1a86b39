"""The router's controller: it probes every region's /health and /metrics each
router.probe_interval_s, all regions at once, on the router's event loop.

  /health     its round trip feeds the latency EWMA; anything but a 200 in time is a
              failure for the region's breaker (a dead region opens before a request waits
              on it). A success counts for the breaker only while it is half-open: in the
              closed state only requests reset the count, so a region whose /health answers
              but whose requests fail still opens.
  /metrics    moray:num_requests_waiting and moray:kv_cache_usage_perc: the load the policy
              balances and the saturation it spills over from. A failed scrape keeps the last
              values (health, not load, decides whether a region is up).

Neither needs a key (the endpoint leaves both open for probes).
"""

from __future__ import annotations

import asyncio
import time
from typing import Dict

import aiohttp

from moray.serve.router.breaker import BreakerState
from moray.serve.router.region import RegionState, parse_gauges
from moray.serve.router.upstream import TRANSPORT_ERRORS, describe, error_message


class Prober:
    def __init__(self, settings, regions: Dict[str, RegionState], session: aiohttp.ClientSession):
        self.settings, self.regions, self.session = settings, regions, session

    async def run(self) -> None:
        """Probe forever (until cancelled), one round every probe_interval_s."""
        while True:
            started = time.monotonic()
            await self.round()
            await asyncio.sleep(max(0.0, self.settings.probe_interval_s - (time.monotonic() - started)))

    async def round(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in self.regions.values()))

    async def _get(self, url: str) -> tuple:
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=self.settings.probe_timeout_s)) as r:
            return r.status, await r.read()

    async def probe(self, region: RegionState) -> None:
        t0 = time.perf_counter()
        try:
            status, body = await self._get(region.url + "/health")
        except TRANSPORT_ERRORS as err:
            return region.failure(f"/health: {describe(err)}")
        finally:
            region.last_probe_at = time.monotonic()
        region.observe_latency(time.perf_counter() - t0)
        if status != 200:
            return region.failure(f"/health answered {status}: {error_message(body)}")
        if region.breaker.state is BreakerState.HALF_OPEN:
            region.success()
        try:
            status, body = await self._get(region.url + "/metrics")
            if status == 200:
                region.observe_load(parse_gauges(body.decode("utf-8", "replace")))
        except TRANSPORT_ERRORS:
            pass  # the load is unknown this round; the last values stand
