"""The router in front of two regions in this process: each region a real endpoint (the
FastAPI app over its own engine, uvicorn on 127.0.0.1) reached through a TCP proxy that can
cut a connection at a chosen event of a stream, refuse connections, or answer slowly: real
network faults at exact points, which killing whole Ray clusters (tests/test_router_regions.py)
cannot aim. Driven by the official openai client and raw httpx.

Streams cut after any event (or inside one) carry on from the other region and equal the
undisturbed stream, text, finish, usage and id alike; non-streamed requests fail over and
come back after the cool-down; a full region spills over; 4xx answers pass through and
never count against a region; hedging; keys at both hops; the table and the metrics."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from router_helpers import CuttingProxy, RouterThread
from serve_helpers import ServerThread, save_tiny_model
from test_router_tokens import VARIED

from moray.platform.config import ServeConfig
from moray.serve.openai.api import build_api
from moray.serve.openai.auth import APIKeys
from moray.serve.router.app import build_router
from moray.serve.router.config import build_regions
from moray.serve.server import LLMServer

SERVE = dict(dtype="float32", kv_cache_blocks=128, kv_block_size=16, max_num_seqs=8, max_batch_tokens=256,
             model_name="tiny", max_n=4, max_tokens_default=24)
UPSTREAM_KEY, CLIENT_KEY = "region-key", "client-key"
AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
ROUTER = dict(region="a", probe_interval_s=0.2, probe_timeout_s=2.0, breaker=dict(failures=2, cool_down_s=1.0,
                                                                                   successes=1))
GREEDY = dict(model="tiny", temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
PROMPTS = ["the moray", "def f(x):"]


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    """Two regions: `a` small (2 sequences, then 429), `b` roomy; both want UPSTREAM_KEY."""
    model = save_tiny_model(tmp_path_factory.mktemp("failover") / "tiny", VARIED, seed=1)
    small = LLMServer.from_path(str(model), ServeConfig(**{**SERVE, "max_num_seqs": 2, "max_queue": 0}))
    roomy = LLMServer.from_path(str(model), ServeConfig(**SERVE))
    keys = APIKeys([UPSTREAM_KEY])
    with ServerThread(build_api(small, small.serve, keys=keys)) as ea, \
            ServerThread(build_api(roomy, roomy.serve, keys=keys)) as eb, \
            CuttingProxy(ea.port) as a, CuttingProxy(eb.port) as b:
        yield {"a": a, "b": b, "direct": eb.url}
    small.engine.shutdown()
    roomy.engine.shutdown()


def start_router(regions, **settings):
    cfg = build_regions({"router": {**ROUTER, **settings}, "regions": [
        {"name": "a", "url": regions["a"].url, "location": "here", "api_key_env": "A_KEY"},
        {"name": "b", "url": regions["b"].url, "location": "there", "api_key": UPSTREAM_KEY}]})
    return RouterThread(build_router(cfg, keys=APIKeys([CLIENT_KEY]), environ={"A_KEY": UPSTREAM_KEY}))


@pytest.fixture(scope="module")
def router(regions):
    with start_router(regions) as rt:
        yield rt


@pytest.fixture
def clean(regions, router):
    """Both regions up and closed before a test (a failover test leaves one down)."""
    for proxy in (regions["a"], regions["b"]):
        proxy.up()
        proxy.delay_s = proxy.tail_delay_s = 0.0
        proxy._cut = None
    _until(router, lambda t: all(r["status"] == "up" for r in t["regions"]), "both regions up")
    return router


def _until(rt, predicate, what, tries=200):
    pause = threading.Event()
    for _ in range(tries):  # bounded: the probes run every 0.2 s
        table = httpx.get(rt.url + "/regions", headers=AUTH).json()
        if predicate(table):
            return table
        pause.wait(0.05)
    raise AssertionError(f"never {what}: {json.dumps(table)[:2000]}")


def client(rt, key=CLIENT_KEY):
    return openai.OpenAI(base_url=rt.url + "/v1", api_key=key, max_retries=0)


def metric(rt, name, **labels):
    text = httpx.get(rt.url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def read_stream(chunks):
    """(text, finish, usage, ids) of an openai client stream, completions or chat."""
    text, finish, usage, ids = "", None, None, set()
    for c in chunks:
        ids.add(c.id)
        usage = c.usage or usage
        for choice in c.choices:
            text += getattr(choice, "text", None) or (getattr(choice, "delta", None) and choice.delta.content) or ""
            finish = choice.finish_reason or finish
    return text, finish, usage.model_dump() if usage else None, ids


# ---------------------------------------------------------------- streams


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_stream_cut_anywhere_equals_the_undisturbed_stream(regions, clean, kind):
    rt, c = clean, client(clean)
    counts = lambda: (metric(rt, "moray:router_requests_total", region="a", outcome="failed"),  # noqa: E731
                      metric(rt, "moray:router_failovers_total", kind="resume"),
                      metric(rt, "moray:router_failovers_total", kind="restart"),
                      metric(rt, "moray:router_failovers_total", kind="retry"))
    before = counts()

    def run(prompt, stop=None):
        kw = dict(GREEDY, stream=True, stream_options={"include_usage": True}, stop=stop)
        if kind == "completion":
            return read_stream(c.completions.create(prompt=prompt, **kw))
        return read_stream(c.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw))

    tries = 0
    for prompt in PROMPTS:
        text, finish, usage, ids = run(prompt)
        assert len(text) > 10 and len(ids) == 1
        for stop in (None, [text[15:17]]):
            whole = run(prompt, stop) if stop else (text, finish, usage, ids)
            for events, extra in ((0, 0), (1, 0), (2, 7), (5, 0), (9, 3), (17, 0)):
                regions["a"].cut_after(events, extra)  # (a stream with fewer events is not cut)
                got = run(prompt, stop)
                assert got[:3] == whole[:3], (prompt, stop, events, extra)
                assert len(got[3]) == 1  # one stream id, though two regions wrote it
                tries += 1
    cuts, resumes, restarts, retries = (after - b for after, b in zip(counts(), before))
    # every cut went on elsewhere once, but one after the finish chunk (the router writes usage and [DONE])
    assert cuts >= 0.75 * tries and cuts - 2 <= resumes + restarts + retries <= cuts
    # cut before the first event: restarted (retried, when the reset beat the headers); after: resumed
    assert restarts + retries >= 4 and resumes >= 0.5 * tries


def test_finished_streams_give_their_connection_back_to_the_pool(regions, clean):
    """Even when the body's last chunk comes a little after [DONE] (across a wide-area network),
    the router waits for it, so the next stream needs no new connection (nor TLS handshake)."""
    c, proxy = client(clean), regions["a"]
    proxy.tail_delay_s = 0.05
    read_stream(c.completions.create(prompt="warm", stream=True, **GREEDY))
    before = proxy.accepted
    for i in range(6):
        assert read_stream(c.completions.create(prompt=f"pooled {i}", stream=True, **GREEDY))[1] == "length"
    assert proxy.accepted - before <= 2  # (a probe may open one meanwhile)


def test_a_stream_of_several_choices_cut_mid_way_ends_with_an_error_event(regions, clean):
    regions["a"].cut_after(3)
    body = {"model": "tiny", "prompt": "the moray", "n": 2, "max_tokens": 30, "temperature": 1.0, "seed": 3,
            "stream": True}
    with httpx.stream("POST", clean.url + "/v1/completions", json=body, headers=AUTH) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_unavailable" and "cannot be resumed" in error["message"]


# ---------------------------------------------------------------- non-streamed


def test_non_streamed_requests_fail_over_and_come_back_after_the_cool_down(regions, clean):
    rt, c = clean, client(clean)
    regions["a"].down()
    for i in range(6):  # the first two find `a` refusing (its breaker opens), the rest skip it
        r = c.completions.with_raw_response.create(prompt=f"request {i}", **GREEDY)
        assert r.headers["x-moray-region"] == "b" and r.parse().usage.completion_tokens == 40
    table = _until(rt, lambda t: t["regions"][0]["status"] == "down", "a down")
    assert "Cannot connect" in table["regions"][0]["why"]  # refused: nothing listens there
    assert metric(rt, "moray:router_breaker_state", region="a") == 2
    assert metric(rt, "moray:router_failovers_total", region="a", kind="retry") >= 1
    regions["a"].up()
    _until(rt, lambda t: t["regions"][0]["status"] == "up", "a back after its cool-down")
    r = c.completions.with_raw_response.create(prompt="back", **GREEDY)
    assert (r.headers["x-moray-region"], r.headers["x-moray-route"]) == ("a", "preferred")


def test_a_full_region_spills_over(regions, clean):
    """`a` admits 2 sequences and answers 429 past that: the rest go to `b`, none fails."""
    rt, c = clean, client(clean)
    spills = metric(rt, "moray:router_failovers_total", region="a", kind="spill")
    with ThreadPoolExecutor(6) as pool:
        served = list(pool.map(lambda i: c.completions.with_raw_response.create(
            prompt=f"busy {i}", **{**GREEDY, "max_tokens": 60}).headers["x-moray-region"], range(6)))
    assert "a" in served and "b" in served
    assert metric(rt, "moray:router_failovers_total", region="a", kind="spill") > spills
    assert metric(rt, "moray:router_requests_total", region="a", outcome="saturated") >= 1


def test_client_errors_pass_through_and_never_count_against_a_region(clean):
    rt = clean
    before = metric(rt, "moray:router_requests_total", outcome="failed")
    for _ in range(4):
        with pytest.raises(openai.BadRequestError) as err:
            client(rt).completions.create(model="tiny", prompt="x", temperature=-1)
        assert err.value.body["param"] == "temperature"  # the region's own answer
    with pytest.raises(openai.NotFoundError):
        client(rt).completions.create(model="gpt-9", prompt="x")
    bad = httpx.post(rt.url + "/v1/completions", content=b'{"model": ', headers=AUTH)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]  # the router's own
    assert metric(rt, "moray:router_requests_total", outcome="failed") == before
    assert metric(rt, "moray:router_requests_total", region="a", outcome="client_error") >= 5
    assert all(r["failures_in_a_row"] == 0 and r["breaker"] == "closed"
               for r in httpx.get(rt.url + "/regions", headers=AUTH).json()["regions"])


def test_keys_at_both_hops(regions, clean):
    with pytest.raises(openai.AuthenticationError):
        client(clean, key="wrong").completions.create(prompt="x", **GREEDY)
    assert httpx.post(clean.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    assert httpx.get(clean.url + "/health").status_code == 200  # probes need no key
    # a region that refuses the router's upstream key is a failing region, not the client's fault
    cfg = build_regions({"router": ROUTER, "regions": [
        {"name": "a", "url": regions["a"].url, "api_key": "stale"}, {"name": "b", "url": regions["b"].url,
                                                                       "api_key": UPSTREAM_KEY}]})
    with RouterThread(build_router(cfg, keys=APIKeys([]))) as rt:
        r = client(rt, "anything").completions.with_raw_response.create(prompt="x", **GREEDY)
        assert r.headers["x-moray-region"] == "b"
        assert "answered 401" in httpx.get(rt.url + "/regions").json()["regions"][0]["last_error"]  # no keys here


def test_hedging_asks_the_next_region_when_the_first_is_slow(regions, clean):
    regions["a"].delay_s = 1.5
    with start_router(regions, hedge_after_ms=100) as hedged:
        c = client(hedged)
        r = c.completions.with_raw_response.create(prompt="hedge", **GREEDY)
        assert r.headers["x-moray-region"] == "b"
        assert metric(hedged, "moray:router_hedges_total", region="a") == 1
    # without hedging a slow region is waited for: the request is never at two regions at once
    before = metric(clean, "moray:router_requests_total", region="b")
    r = client(clean).completions.with_raw_response.create(prompt="patience", **GREEDY)
    assert r.headers["x-moray-region"] == "a" and metric(clean, "moray:router_requests_total", region="b") == before


def test_no_region_up_is_a_503_with_retry_after(regions, clean):
    regions["a"].down()
    regions["b"].down()
    _until(clean, lambda t: all(r["status"] == "down" for r in t["regions"]), "both down")
    r = httpx.post(clean.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=AUTH)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert "circuit breaker is open" in r.json()["error"]["message"]
    assert httpx.get(clean.url + "/health").status_code == 503


def test_models_table_and_metrics(clean):
    assert [m.id for m in client(clean).models.list().data] == ["tiny"]
    assert httpx.get(clean.url + "/regions").status_code == 401  # it names the regions' addresses
    table = httpx.get(clean.url + "/regions", headers=AUTH).json()
    assert table["router_region"] == "a" and [r["name"] for r in table["regions"]] == ["a", "b"]
    row = table["regions"][0]
    for key in ("status", "why", "breaker", "latency_ms", "queue_depth", "kv_usage", "in_flight", "requests",
                "errors", "last_probe_age_s"):
        assert key in row
    assert row["latency_ms"] > 0 and row["last_probe_age_s"] < 5
    for name in ("moray:router_requests_total", "moray:router_failovers_total", "moray:router_breaker_state",
                 "moray:router_upstream_latency_seconds_count", "moray:router_region_latency_seconds"):
        assert metric(clean, name) >= 0
