"""Which regions a request tries, in order, and why.

    plan = policy.plan(client_region, session, prefix_key(body, settings.affinity))
    for route in plan: ... route.region, route.reason ...
    policy.served(region, session, prefix)        # remember where it went

The order (a region appears once, at its first place):
  1. session     the region an `x-moray-session` conversation was served by last
  2. prefix      the region that served the same long prefix (its prefix cache is warm),
                 if it is within the latency budget
  3. preferred   the client's region (`x-moray-region`: a region's name or location),
                 else the router's own; least loaded first when a location has several
  4. least-loaded  every other region within the latency budget, least loaded first
  5. far         the regions beyond the budget, nearest first
  6. saturated   regions that are full (429s, queue or KV over the thresholds), least loaded
                 first: a full region may still answer, which beats no answer
Steps 1-5 skip saturated regions (that is the spill-over), and every step skips a region
whose breaker is open (or half-open with its trial slots taken).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional

from moray.serve.router.region import RegionState


@dataclass
class Route:
    region: RegionState
    reason: str


class Pins:
    """key -> region name, the least recently used forgotten past max_entries, any after ttl_s."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_entries, self.ttl_s, self.clock = max_entries, ttl_s, clock
        self._items: "OrderedDict[Hashable, tuple]" = OrderedDict()

    def get(self, key: Hashable) -> Optional[str]:
        item = self._items.get(key)
        if item is None:
            return None
        name, seen = item
        if self.clock() - seen > self.ttl_s:
            del self._items[key]
            return None
        return name

    def put(self, key: Hashable, name: str) -> None:
        self._items[key] = (name, self.clock())
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _message_text(messages) -> str:
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: their text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{m.get('role')}\x1f{content if isinstance(content, str) else ''}\x1e")
    return "".join(parts)


def prefix_key(body: dict, affinity) -> Optional[int]:
    """A key for the request's first prefix_chars characters (prefix_tokens ids), or None
    when it has no prefix that long. The model is part of it: two models share no cache.
    A hash, so 100k remembered prefixes cost a few MB; a collision only misplaces a hint."""
    key = None
    if "messages" in body:
        messages = body["messages"]
        text = _message_text(messages) if isinstance(messages, list) else ""
        if len(text) >= affinity.prefix_chars:
            key = ("chat", text[:affinity.prefix_chars])
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch: its first prompt
        if isinstance(prompt, str) and len(prompt) >= affinity.prefix_chars:
            key = ("text", prompt[:affinity.prefix_chars])
        elif isinstance(prompt, list) and len(prompt) >= affinity.prefix_tokens:
            key = ("ids", tuple(prompt[:affinity.prefix_tokens]))
    try:
        return None if key is None else hash((body.get("model"), *key))
    except TypeError:  # a model or token that is no such thing: the region will answer 400
        return None


class Policy:
    def __init__(self, settings, regions: Dict[str, RegionState], clock: Callable[[], float] = time.monotonic):
        self.settings, self.regions = settings, regions
        a = settings.affinity
        self.sessions = Pins(a.max_entries, a.ttl_s, clock)
        self.prefixes = Pins(a.max_entries, a.ttl_s, clock)

    def plan(self, client_region: Optional[str] = None, session: Optional[str] = None,
             prefix: Optional[Hashable] = None, exclude: tuple = ()) -> List[Route]:
        usable = [r for r in self.regions.values() if r.name not in exclude and r.breaker.allows()]
        busy = {r.name: r.saturated() for r in usable}
        free = [r for r in usable if not busy[r.name]]
        order: List[Route] = []
        seen = set()

        def add(region: Optional[RegionState], reason: str) -> None:
            if region is not None and region.name not in seen:
                seen.add(region.name)
                order.append(Route(region, reason))

        def pinned(name: Optional[str]) -> Optional[RegionState]:
            r = self.regions.get(name) if name else None
            return r if r is not None and r in free else None

        if session:
            add(pinned(self.sessions.get(session)), "session")
        if prefix is not None:
            hit = pinned(self.prefixes.get(prefix))
            add(hit if hit is not None and hit.near else None, "prefix")
        wanted = client_region if client_region and self._known(client_region) else self.settings.region
        for r in sorted((r for r in free if wanted in (r.name, r.location)), key=_by_load):
            add(r, "preferred")
        for r in sorted((r for r in free if r.near), key=_by_load):
            add(r, "least-loaded")
        for r in sorted((r for r in free if not r.near), key=lambda r: r.latency_s):
            add(r, "far")
        for r in sorted((r for r in usable if busy[r.name]), key=_by_load):
            add(r, "saturated")
        return order

    def _known(self, label: str) -> bool:
        return any(label in (r.name, r.location) for r in self.regions.values())

    def served(self, region: RegionState, session: Optional[str], prefix: Optional[Hashable]) -> None:
        """Pin the session and the prefix to where the request was answered (after a failover,
        that is the new region: the conversation's cache is there now)."""
        if session:
            self.sessions.put(session, region.name)
        if prefix is not None:
            self.prefixes.put(prefix, region.name)


def _by_load(r: RegionState):
    return (r.load, r.kv_usage, r.latency_s if r.latency_s is not None else 0.0)
