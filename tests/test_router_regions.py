"""Acceptance: two regions, each a real `python jobs/serve.py` with its own local Ray cluster
on its own port, and `moray route` in front of them, all separate processes on 127.0.0.1,
driven by the official openai client. Started once for the module (a Ray cluster with
Serve takes a minute on 2 shared cores); the tests run in order and share them:

  requests go to the preferred region (the router's own, or the client's header);
  a shared long prefix and a session stay where they were first served;
  a saturated region (429s, a long queue) spills over to the other;
  killing a region mid-load (SIGKILL to its whole process tree) fails no non-streamed
  request and breaks no stream: greedy streams cut mid-way equal the undisturbed ones;
  bringing it back restores its traffic after the breaker's cool-down.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from router_helpers import ROOT, kill_region, start_region, stop_region, wait_healthy
from serve_helpers import free_port, save_tiny_model
from test_router_tokens import VARIED

pytestmark = [pytest.mark.ray, pytest.mark.slow]
MODEL = replace(VARIED, max_seq_len=512)  # room for a long system prompt and 120-token streams
CLIENT_KEY, EAST_KEY, WEST_KEY = "client-key", "east-key", "west-key"
# capacity 4 + 2 sequences per region (then 429): small, so that saturation is cheap to reach
OVERRIDES = ["serve.dtype=float32", "serve.model_name=tiny", "serve.kv_cache_blocks=256", "serve.max_num_seqs=4",
             "serve.max_queue=2", "serve.retry_after_s=1"]
GREEDY = dict(model="tiny", temperature=0, extra_body={"ignore_eos": True})
SYSTEM = ("You are a moray eel who lives in a reef. You answer questions about reefs, fish, caves and the sea, "
          "briefly, in one sentence, and you never talk about anything that happens on land or in the air. "
          "You are proud of your teeth.")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    model = save_tiny_model(root / "tiny", MODEL, seed=1)
    regions = {}
    for name, key in (("east", EAST_KEY), ("west", WEST_KEY)):
        (root / f"{name}.keys").write_text(key + "\n")
        port = free_port()
        log = root / f"{name}.log"
        regions[name] = dict(port=port, url=f"http://127.0.0.1:{port}", log=log, model=model,
                             overrides=OVERRIDES + [f"serve.api_keys_file={root / f'{name}.keys'}"])
        regions[name]["proc"] = start_region(model, port, log, regions[name]["overrides"])
    config = {"router": {"region": "east", "probe_interval_s": 0.3, "queue_threshold": 2,
                         "breaker": {"failures": 2, "cool_down_s": 3, "successes": 2},
                         "affinity": {"prefix_chars": 200}},
              "regions": [{"name": "east", "url": regions["east"]["url"], "location": "virginia",
                           "api_key_env": "MORAY_EAST_KEY"},
                          {"name": "west", "url": regions["west"]["url"], "location": "oregon", "api_key": WEST_KEY}]}
    (root / "regions.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "MORAY_API_KEYS": CLIENT_KEY, "MORAY_EAST_KEY": EAST_KEY, "PYTHONUNBUFFERED": "1"}
    router_log = root / "router.log"
    router = None
    try:
        for r in regions.values():
            wait_healthy(r["url"], r["proc"], r["log"])
        router = subprocess.Popen([sys.executable, "-m", "moray.platform.cli", "route", "--config",
                                   str(root / "regions.yaml"), "--port", str(port)], cwd=ROOT, env=env,
                                  stdout=open(router_log, "wb"), stderr=subprocess.STDOUT)
        wait_healthy(f"http://127.0.0.1:{port}", router, router_log, timeout_s=60)
        yield dict(regions=regions, url=f"http://127.0.0.1:{port}", router_log=router_log)
    finally:
        if router is not None:
            router.terminate()
            router.wait(30)
        for r in regions.values():
            stop_region(r["proc"])


def client(cluster, **headers):
    return openai.OpenAI(base_url=cluster["url"] + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=120,
                         default_headers=headers)


def direct(cluster, name):
    key = {"east": EAST_KEY, "west": WEST_KEY}[name]
    return openai.OpenAI(base_url=cluster["regions"][name]["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def table(cluster):
    regions = httpx.get(cluster["url"] + "/regions", headers={"authorization": f"Bearer {CLIENT_KEY}"})
    return {r["name"]: r for r in regions.json()["regions"]}


def metric(url, name, **labels):
    text = httpx.get(url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def served_by(response) -> str:
    return response.headers["x-moray-region"]


def test_requests_go_to_the_preferred_region(cluster):
    kw = dict(prompt="the moray", max_tokens=12, **GREEDY)
    r = client(cluster).completions.with_raw_response.create(**kw)
    assert (served_by(r), r.headers["x-moray-route"]) == ("east", "preferred")  # the router's own region
    r = client(cluster, **{"x-moray-region": "west"}).completions.with_raw_response.create(**kw)
    assert served_by(r) == "west"
    r = client(cluster, **{"x-moray-region": "oregon"}).completions.with_raw_response.create(**kw)
    assert served_by(r) == "west"  # a location names its region too
    assert r.parse().choices[0].text == direct(cluster, "east").completions.create(**kw).choices[0].text
    with pytest.raises(openai.AuthenticationError):  # the router checks the clients' keys itself
        openai.OpenAI(base_url=cluster["url"] + "/v1", api_key=EAST_KEY, max_retries=0).completions.create(**kw)


def test_prefix_affinity_and_session_pinning_hold(cluster):
    west_url = cluster["regions"]["west"]["url"]
    hits = metric(west_url, "moray:prefix_cache_hits_total")

    def ask(question, region, session=None):
        headers = {"x-moray-region": region, **({"x-moray-session": session} if session else {})}
        return client(cluster, **headers).chat.completions.with_raw_response.create(
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            max_tokens=4, **GREEDY)

    assert served_by(ask("what do you eat?", "west")) == "west"
    for q in ("where do you sleep?", "who hunts you?", "how long do you live?"):
        r = ask(q, "east")  # the client is near east, but west holds this system prompt's cache
        assert (served_by(r), r.headers["x-moray-route"]) == ("west", "prefix")
    assert metric(west_url, "moray:prefix_cache_hits_total") > hits  # and it did hit there

    kw = dict(prompt="short prompt", max_tokens=4, **GREEDY)
    first = client(cluster, **{"x-moray-region": "west", "x-moray-session": "conv-1"})
    assert served_by(first.completions.with_raw_response.create(**kw)) == "west"
    pinned = client(cluster, **{"x-moray-region": "east", "x-moray-session": "conv-1"})
    for _ in range(3):
        r = pinned.completions.with_raw_response.create(**kw)
        assert (served_by(r), r.headers["x-moray-route"]) == ("west", "session")
    other = client(cluster, **{"x-moray-region": "east", "x-moray-session": "conv-2"})
    assert served_by(other.completions.with_raw_response.create(**kw)) == "east"


def test_a_saturated_region_spills_over(cluster):
    """East admits 6 sequences (then 429s; its queue shows in /metrics): 12 at once all
    succeed, the overflow served by west, having left the preferred region for it."""
    c = client(cluster)

    def one(i):
        r = c.completions.with_raw_response.create(prompt=f"busy reef {i}", max_tokens=48, **GREEDY)
        assert r.parse().usage.completion_tokens == 48
        return served_by(r), r.headers["x-moray-route"]

    with ThreadPoolExecutor(12) as pool:
        served = list(pool.map(one, range(12)))
    regions = [region for region, _ in served]
    assert regions.count("east") >= 2 and regions.count("west") >= 2, served
    # west was not preferred: it took the request after a 429 (failover:...) or because east's
    # queue was over router.queue_threshold when the request came (east went last, saturated)
    assert {route for region, route in served if region == "west"} <= {"least-loaded", "failover:least-loaded"}


def test_losing_a_region_mid_load_fails_nothing_and_streams_go_on_token_for_token(cluster):
    east = cluster["regions"]["east"]
    stream_kw = dict(max_tokens=200, stream=True, stream_options={"include_usage": True}, **GREEDY)
    messages = [{"role": "user", "content": "tell me about the reef"}]
    # the undisturbed streams, from west (the same weights)
    ref_text = "".join(c.choices[0].text for c in direct(cluster, "west").completions.create(
        prompt="once upon a time", **stream_kw) if c.choices)
    ref_chat = "".join(c.choices[0].delta.content or "" for c in direct(cluster, "west").chat.completions.create(
        messages=messages, **stream_kw) if c.choices)

    stop, started, results, errors = threading.Event(), threading.Event(), [], []
    progress, finished = {"completion": 0, "chat": 0}, {}

    def non_streamed(i):
        c = client(cluster)
        while not stop.is_set():
            try:
                r = c.completions.with_raw_response.create(prompt=f"load {i}", max_tokens=16, **GREEDY)
                assert r.parse().usage.completion_tokens == 16
                results.append((time.monotonic(), served_by(r)))
            except Exception as err:  # noqa: BLE001 - every failure is the test's failure
                errors.append(repr(err))

    def streamed(kind):
        c = client(cluster)
        if kind == "completion":
            raw = c.completions.with_raw_response.create(prompt="once upon a time", **stream_kw)
        else:
            raw = c.chat.completions.with_raw_response.create(messages=messages, **stream_kw)
        first_region, text, usage = served_by(raw), "", None
        for chunk in raw.parse():
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text += (choice.text if kind == "completion" else choice.delta.content) or ""
                progress[kind] += 1
                if choice.finish_reason:
                    finished[kind] = time.monotonic()
        return first_region, text, usage

    with ThreadPoolExecutor(6) as pool:
        load = [pool.submit(non_streamed, i) for i in range(4)]
        streams = {kind: pool.submit(streamed, kind) for kind in ("completion", "chat")}
        pause = threading.Event()
        for _ in range(1200):  # bounded: until both streams are well under way and east has served load
            if min(progress.values()) >= 15 and any(r == "east" for _, r in results):
                break
            pause.wait(0.05)
        assert min(progress.values()) >= 15, progress
        killed_at = time.monotonic()
        kill_region(east["proc"])
        at_kill = dict(progress)
        outs = {kind: f.result(timeout=300) for kind, f in streams.items()}
        for _ in range(600):  # the load goes on until several requests were answered well after the kill
            if sum(1 for t, _ in results if t > killed_at + 0.5) >= 8:
                break
            pause.wait(0.05)
        stop.set()
        for f in load:
            f.result(timeout=120)
    assert errors == []  # no non-streamed request failed
    assert outs["completion"][0] == "east" and outs["chat"][0] == "east"  # both began in east
    # ... and were cut mid-way: neither had finished when east was gone
    assert all(finished[k] > killed_at for k in progress) and max(at_kill.values()) < 150, (at_kill, progress)
    assert outs["completion"][1] == ref_text and outs["chat"][1] == ref_chat  # token for token
    assert outs["completion"][2].completion_tokens == outs["chat"][2].completion_tokens == 200
    after = [r for t, r in results if t > killed_at + 0.5]
    assert len(after) >= 8 and set(after) == {"west"}
    resumes = metric(cluster["url"], "moray:router_failovers_total", region="east", kind="resume")
    assert resumes >= 2, (resumes, at_kill, cluster["router_log"].read_text()[-2000:])
    assert table(cluster)["east"]["status"] == "down"


def test_bringing_the_region_back_restores_it_after_the_cool_down(cluster):
    east = cluster["regions"]["east"]
    east["proc"] = start_region(east["model"], east["port"], east["log"], east["overrides"])
    wait_healthy(east["url"], east["proc"], east["log"])
    c, pause = client(cluster), threading.Event()
    served = []
    for _ in range(240):  # bounded: the breaker's cool-down (3 s), then 2 successes in half-open
        r = c.completions.with_raw_response.create(prompt="are you back?", max_tokens=4, **GREEDY)
        served.append(served_by(r))
        if served[-1] == "east":
            break
        pause.wait(0.25)
    assert served[-1] == "east", served
    row = table(cluster)["east"]
    assert row["breaker"] in ("closed", "half-open") and row["status"] in ("up", "recovering")
    for _ in range(3):
        assert served_by(c.completions.with_raw_response.create(prompt="and now?", max_tokens=4, **GREEDY)) == "east"
    assert table(cluster)["east"]["breaker"] == "closed"
