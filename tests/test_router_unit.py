"""The router's logic without processes: the breaker's state machine on a fake clock, the
policy's order (session, prefix, preferred, load, latency budget, spill-over), the region
table, prefix keys, the regions file's errors, and the relay's bookkeeping of a stream."""

from __future__ import annotations

import json

import pytest

from moray.platform.config import ConfigError
from moray.serve.router.breaker import BreakerState, CircuitBreaker
from moray.serve.router.config import AffinitySettings, BreakerSettings, build_regions
from moray.serve.router.policy import Pins, Policy, prefix_key
from moray.serve.router.region import RegionState, parse_gauges
from moray.serve.router.stream import StreamRelay, resumable, sse_data
from moray.serve.router.upstream import classify


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- breaker


def test_breaker_opens_after_n_failures_and_closes_after_m_successes():
    clock = Clock()
    b = CircuitBreaker(BreakerSettings(failures=3, cool_down_s=10, successes=2), clock)
    b.record_failure("a")
    b.record_failure("b")
    b.record_success()  # a success in between: the count starts again
    b.record_failure("c")
    b.record_failure("d")
    assert b.state is BreakerState.CLOSED and b.allows()
    b.record_failure("e")
    assert b.state is BreakerState.OPEN and not b.allows() and not b.acquire()
    assert "3 failures in a row" in b.why and "e" in b.why
    clock.now += 9.9
    assert b.state is BreakerState.OPEN and b.seconds_to_trial() == pytest.approx(0.1)
    b.record_success()  # a request that began before it opened: not enough to close it
    assert b.state is BreakerState.OPEN
    clock.now += 0.1
    assert b.state is BreakerState.HALF_OPEN
    assert b.acquire() and not b.acquire()  # one trial at a time
    b.release()
    b.record_success()
    assert b.state is BreakerState.HALF_OPEN
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.failures_in_a_row == 0 and b.allows()


def test_a_failed_trial_opens_the_breaker_again_for_a_whole_cool_down():
    clock = Clock()
    b = CircuitBreaker(BreakerSettings(failures=1, cool_down_s=5, successes=1, trials=2), clock)
    b.record_failure("down")
    clock.now += 5
    assert b.acquire() and b.acquire() and not b.acquire()  # trials=2
    b.record_failure("still down")
    assert b.state is BreakerState.OPEN and "a trial failed" in b.why
    clock.now += 4.9
    assert b.state is BreakerState.OPEN
    clock.now += 0.1
    assert b.state is BreakerState.HALF_OPEN and b.acquire()


# ---------------------------------------------------------------- policy

SETTINGS = dict(region="east", latency_budget_ms=100, queue_threshold=8, kv_threshold=0.9,
                breaker=dict(failures=2, cool_down_s=10, successes=1),
                affinity=dict(prefix_chars=20, prefix_tokens=4, max_entries=3, ttl_s=60))


def make(clock, *regions, **settings):
    cfg = build_regions({"router": {**SETTINGS, **settings},
                         "regions": [dict(url=f"http://127.0.0.1:{9000 + i}", **r) for i, r in enumerate(regions)]})
    states = {r.name: RegionState(r, cfg.router, None, clock) for r in cfg.regions}
    return Policy(cfg.router, states, clock), states


def names(plan):
    return [(r.region.name, r.reason) for r in plan]


def test_preferred_region_first_then_least_loaded_within_the_budget_then_far():
    clock = Clock()
    policy, r = make(clock, dict(name="east", location="us"), dict(name="central", location="us"),
                     dict(name="west", location="eu"), dict(name="far", location="ap"))
    for name, ms in {"east": 5, "central": 20, "west": 30, "far": 250}.items():
        r[name].observe_latency(ms / 1e3)
    r["central"].in_flight = 3
    assert names(policy.plan()) == [("east", "preferred"), ("west", "least-loaded"), ("central", "least-loaded"),
                                    ("far", "far")]
    # a client names its region or its location; unknown names fall back to the router's own region
    assert names(policy.plan("west"))[0] == ("west", "preferred")
    assert names(policy.plan("us"))[:2] == [("east", "preferred"), ("central", "preferred")]
    assert names(policy.plan("mars"))[0] == ("east", "preferred")
    # weight: central at weight 4 with 3 in flight is less loaded than west with 1
    r["west"].in_flight = 1
    r["central"].weight = 4
    assert [n for n, _ in names(policy.plan())][1:3] == ["central", "west"]


def test_saturated_regions_spill_over_and_come_last():
    clock = Clock()
    policy, r = make(clock, dict(name="east"), dict(name="west"))
    r["east"].observe_load({"moray:num_requests_waiting": 8.0, "moray:kv_cache_usage_perc": 0.5})
    assert names(policy.plan()) == [("west", "least-loaded"), ("east", "saturated")]
    assert r["east"].row()["status"] == "saturated" and "8 sequences waiting" in r["east"].row()["why"]
    r["east"].observe_load({"moray:kv_cache_usage_perc": 0.95})
    assert "KV cache 95% full" in r["east"].saturated()
    r["east"].observe_load({})
    r["east"].refused(2.0)  # a 429 with Retry-After: 2
    assert names(policy.plan())[0] == ("west", "least-loaded")
    clock.now += 2.0
    assert names(policy.plan())[0] == ("east", "preferred")


def test_open_breakers_are_skipped_and_half_open_ones_get_a_trial():
    clock = Clock()
    policy, r = make(clock, dict(name="east"), dict(name="west"))
    r["east"].failure("connection refused")
    r["east"].failure("connection refused")
    assert names(policy.plan()) == [("west", "least-loaded")]
    row = r["east"].row()
    assert row["status"] == "down" and "connection refused" in row["why"] and "trial in 10.0 s" in row["why"]
    clock.now += 10
    assert names(policy.plan())[0] == ("east", "preferred") and r["east"].row()["status"] == "recovering"
    assert r["east"].breaker.acquire()  # the trial is taken: others go elsewhere meanwhile
    assert names(policy.plan()) == [("west", "least-loaded")]
    r["west"].failure("x")
    r["west"].failure("x")
    assert policy.plan() == []  # nothing can take a request: the router answers 503


def test_session_and_prefix_pins_come_first_unless_that_region_is_full_or_far():
    clock = Clock()
    policy, r = make(clock, dict(name="east"), dict(name="west"), dict(name="moon"))
    r["moon"].observe_latency(0.5)  # beyond the 100 ms budget
    policy.served(r["west"], "s1", ("text", "m", "p" * 20))
    policy.served(r["moon"], None, ("text", "m", "q" * 20))
    assert names(policy.plan(session="s1"))[0] == ("west", "session")
    assert names(policy.plan(prefix=("text", "m", "p" * 20)))[0] == ("west", "prefix")
    assert names(policy.plan(prefix=("text", "m", "q" * 20)))[0] == ("east", "preferred")  # moon is too far
    r["west"].refused(1.0)
    assert names(policy.plan(session="s1"))[0] == ("east", "preferred")
    clock.now += 61  # pins are forgotten after ttl_s
    r["west"].saturated_until = 0
    assert names(policy.plan(session="s1"))[0] == ("east", "preferred")


def test_pins_forget_the_least_recently_used():
    clock = Clock()
    pins = Pins(max_entries=2, ttl_s=10, clock=clock)
    pins.put("a", "x")
    pins.put("b", "y")
    assert pins.get("a") == "x"
    pins.put("a", "x")
    pins.put("c", "z")  # b was used least recently
    assert (pins.get("a"), pins.get("b"), pins.get("c"), len(pins)) == ("x", None, "z", 2)


def test_prefix_keys_need_a_long_prefix_and_name_the_model():
    a = AffinitySettings(prefix_chars=10, prefix_tokens=3)
    assert prefix_key({"model": "m", "prompt": "short"}, a) is None
    assert prefix_key({"model": "m", "prompt": "0123456789 abc"}, a) == prefix_key({"model": "m",
                                                                                       "prompt": "0123456789 xyz"}, a)
    assert prefix_key({"model": "m", "prompt": "0123456789"}, a) != prefix_key({"model": "n", "prompt": "0123456789"},
                                                                               a)
    assert prefix_key({"model": "m", "prompt": [1, 2, 3, 4]}, a) == prefix_key({"model": "m", "prompt": [1, 2, 3]}, a)
    assert prefix_key({"model": "m", "prompt": ["0123456789a", "zz"]}, a) is not None  # a batch: its first prompt
    sys_prompt = {"role": "system", "content": "you are a moray"}
    k1 = prefix_key({"model": "m", "messages": [sys_prompt, {"role": "user", "content": "hi"}]}, a)
    k2 = prefix_key({"model": "m", "messages": [sys_prompt, {"role": "user", "content": [{"type": "text",
                                                                                          "text": "yo"}]}]}, a)
    assert k1 == k2 is not None


# ---------------------------------------------------------------- config, gauges, outcomes


def test_the_regions_file_names_bad_keys_and_values():
    good = {"router": {"region": "east"}, "regions": [{"name": "east", "url": "http://h:1"}]}
    assert build_regions(good).regions[0].weight == 1.0
    with pytest.raises(ConfigError, match=r"router\.probe_intervl_s: unknown key \(did you mean "
                                          r"router\.probe_interval_s\?\)"):
        build_regions({**good, "router": {"region": "east", "probe_intervl_s": 1}})
    with pytest.raises(ConfigError, match=r"regions\.0\.wieght: unknown key.*allowed keys: api_key, api_key_env"):
        build_regions({**good, "regions": [{"name": "east", "url": "http://h:1", "wieght": 2}]})
    with pytest.raises(ConfigError, match=r"regions\.0\.weight: Input should be greater than 0"):
        build_regions({**good, "regions": [{"name": "east", "url": "http://h:1", "weight": 0}]})
    with pytest.raises(ConfigError, match="router.region 'north' is neither"):
        build_regions({**good, "router": {"region": "north"}})
    with pytest.raises(ConfigError, match="starts with http"):
        build_regions({**good, "regions": [{"name": "east", "url": "h:1"}]})
    cfg = build_regions({**good, "regions": [{"name": "east", "url": "http://h:1/", "api_key_env": "EAST_KEY"}]})
    assert cfg.regions[0].url == "http://h:1"
    with pytest.raises(ConfigError, match="EAST_KEY is not set"):
        cfg.upstream_keys(environ={})
    assert cfg.upstream_keys(environ={"EAST_KEY": "k"}) == {"east": "k"}
    inline = build_regions({**good, "regions": [{"name": "east", "url": "http://h:1", "api_key": "sekrit"}]})
    assert "sekrit" not in repr(inline) and inline.upstream_keys(environ={}) == {"east": "sekrit"}


def test_gauges_and_outcomes():
    text = ('# HELP moray:num_requests_waiting x\nmoray:num_requests_waiting{model_name="m",replica="a"} 3.0\n'
            'moray:num_requests_waiting{model_name="m",replica="b"} 2.0\n'
            'moray:kv_cache_usage_perc{model_name="m",replica="a"} 0.25\n'
            'moray:kv_cache_usage_perc{model_name="m",replica="b"} 0.75\nmoray:num_requests_running{} 7.0\n')
    # one sample per replica: the region's queue is their sum, its KV fill their mean
    assert parse_gauges(text) == {"moray:num_requests_waiting": 5.0, "moray:kv_cache_usage_perc": 0.5}
    assert parse_gauges("") == {"moray:num_requests_waiting": 0.0, "moray:kv_cache_usage_perc": 0.0}
    assert [classify(s) for s in (200, 400, 401, 403, 404, 408, 413, 422, 429, 500, 503)] == [
        "ok", "client_error", "failed", "failed", "client_error", "failed", "client_error", "client_error",
        "saturated", "failed", "failed"]


# ---------------------------------------------------------------- the relay's bookkeeping


async def _events(raw: bytes, size: int):
    async def chunks():  # the body as the network may split it
        for i in range(0, len(raw), size):
            yield raw[i:i + size]

    return [e async for e in sse_data(chunks())]


def test_sse_data_drops_a_partial_event_at_the_cut():
    import asyncio

    raw = b'data: {"a":1}\n\ndata: {"b":2}\r\n\r\n: comment\n\ndata: {"c"'
    for size in (1, 3, 7, len(raw)):
        assert asyncio.run(_events(raw, size)) == [b'{"a":1}', b'{"b":2}']


def test_relay_keeps_the_ids_it_passed_on_and_hides_them_unless_asked():
    relay = StreamRelay(None, "/v1/completions", "completion", {"prompt": "x", "stream": True,
                                                                "stream_options": {"include_usage": True}}, ())
    first = {"id": "cmpl-1", "created": 5, "model": "m", "object": "text_completion",
             "choices": [{"index": 0, "text": "ab", "finish_reason": None, "prompt_token_ids": [1, 2, 3],
                          "token_ids": [7, 8]}]}
    out = json.loads(relay.rewrite(json.dumps(first).encode())[6:])
    assert "token_ids" not in out["choices"][0] and "prompt_token_ids" not in out["choices"][0]
    assert relay.sent_ids == [7, 8] and relay.prompt_len == 3 and json.loads(relay.content(resume=True))[
        "continue_token_ids"] == [7, 8]
    relay.resumed = True  # a second region's chunk gets the first one's id
    second = {"id": "cmpl-2", "created": 9, "model": "m", "object": "text_completion",
              "choices": [{"index": 0, "text": "c", "finish_reason": "length", "token_ids": [9]}]}
    out = json.loads(relay.rewrite(json.dumps(second).encode())[6:])
    assert (out["id"], out["created"], relay.sent_ids, relay.finished) == ("cmpl-1", 5, [7, 8, 9], True)
    # cut after the finish: the router writes the usage chunk and [DONE] itself
    usage, done = relay.closing_events()
    assert json.loads(usage[6:])["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert done == b"data: [DONE]\n\n"
    assert resumable({"prompt": [1, 2]}, "completion") and resumable({"prompt": ["a"]}, "completion")
    assert not resumable({"prompt": ["a", "b"]}, "completion") and not resumable({"n": 2}, "chat")


def test_moray_route_names_a_bad_key_in_one_line(tmp_path, capsys):
    from moray.platform.cli import main

    bad = tmp_path / "regions.yaml"
    bad.write_text("router: {region: east, probe_every_s: 1}\nregions: [{name: east, url: 'http://h:1'}]\n")
    assert main(["route", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moray route: error: invalid regions file") and "router.probe_every_s: unknown key" in err
    assert main(["route", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
