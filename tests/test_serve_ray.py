"""The real Ray Serve application, started once for the module on a fresh local Ray cluster
with HAProxy in front (what jobs/serve.py starts): HAProxy -> ingress (FastAPI) -> two LLM
server replicas -> engines, on 127.0.0.1, driven by the official `openai` client.
Completions, a stream and chat through both hops; keys; /metrics is the whole app's (every
replica's counters summed, gauges per replica); a client that goes away mid-stream frees the
KV blocks of the replica across the hop; a replica killed under load loses no non-streamed
request; /health stays 200 while one engine runs and turns 503 when none does."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import free_port, save_tiny_model

pytestmark = pytest.mark.ray
KEY = "ray-test-key"
GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from moray.serve.app import build_app
    from moray.serve.cluster_env import serve_env

    root = tmp_path_factory.mktemp("serve_ray")
    model = save_tiny_model(root / "tiny")
    (root / "keys").write_text(KEY + "\n")
    with pytest.MonkeyPatch.context() as env:  # the cluster's processes inherit it; later modules don't
        for k, v in serve_env("haproxy").items():
            env.setenv(k, v)
        # An ingress replica going away keeps serving 30 s (by default) for load balancers to notice;
        # nothing here needs that, and the module's teardown would wait for it.
        env.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
        # address="local": a cluster of our own, even when another `ray start` runs on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(model), "overrides": [
        "serve.dtype=float32", "serve.model_name=tiny", "serve.kv_cache_blocks=64", "serve.max_num_seqs=8",
        "serve.num_replicas=2", "serve.replica_cpus=1", f"serve.api_keys_file={root / 'keys'}"]}),
        name="moray", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(app_url):
    return openai.OpenAI(base_url=app_url + "/v1", api_key=KEY, max_retries=0)


def _metrics(app_url):
    """{sample name: {replica label or None: value}} from one scrape of the whole app."""
    out = {}
    for f in text_string_to_metric_families(httpx.get(app_url + "/metrics").text):
        for s in f.samples:
            if s.labels.get("finished_reason") not in (None, "length"):
                continue
            out.setdefault(s.name, {})[s.labels.get("replica")] = s.value
    return out


def _replica_snapshots():
    """Each LLM server replica's own numbers, asked directly (what /metrics should add up)."""
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name="moray").broadcast("metrics_snapshot").results(
        timeout_s=30)


def test_completion_stream_chat_models_and_health(client, app_url):
    whole = client.completions.create(model="tiny", prompt="the moray", **GREEDY)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 8
    chunks = list(client.completions.create(model="tiny", prompt="the moray", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2, seed=5,
                                          temperature=1.0, max_tokens=6)
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2, seed=5,
                                           temperature=1.0, max_tokens=6)
    assert [c.message.content for c in chat.choices] == [c.message.content for c in again.choices]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(app_url + "/health")
    assert health.status_code == 200 and health.json()["alive"] is True
    assert health.json()["replicas_alive"] == 2 and len(health.json()["replica_states"]) == 2


def test_n_stop_usage_and_concurrent_greedy_through_serve(client):
    """Through both hops: concurrent greedy requests give the texts they give one by one; a stop
    string cuts the text before it; n choices with their usage counted."""
    prompts = ["def f(", "import os", "class A:", "x = 1", "the moray"]
    one = lambda p: client.completions.create(model="tiny", prompt=p, **GREEDY).choices[0].text  # noqa: E731
    alone = [one(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(one, prompts)) == alone
    full = next(t for t in alone if len(t) >= 5)
    stop = full[3:5]
    cut = client.completions.create(model="tiny", prompt=prompts[alone.index(full)], stop=[stop], **GREEDY)
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    many = client.completions.create(model="tiny", prompt="the", n=3, max_tokens=5, temperature=1.0, seed=3,
                                     extra_body={"ignore_eos": True})
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert many.usage.completion_tokens == 15
    assert many.usage.total_tokens == many.usage.prompt_tokens + 15 and many.usage.prompt_tokens > 0


def test_keys_bad_input_and_metrics(client, app_url):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app_url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny", prompt="x")
    assert httpx.post(app_url + "/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    bad = httpx.post(app_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": -1},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"  # raised by the replica
    m = _metrics(app_url)
    for name in ("moray:time_to_first_token_seconds_count", "moray:num_requests_running",
                 "moray:kv_cache_usage_perc", "moray:generation_tokens_total", "moray:prefix_cache_hits_total"):
        assert name in m, name


def test_metrics_are_the_whole_apps(client, app_url):
    """One scrape: gauges for each of the two replicas (labelled), counters and histograms summed
    over both, equal to what the replicas say of themselves, and they grow by exactly what was asked."""
    before = _metrics(app_url)
    prompts = [f"count {i}" for i in range(8)]
    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: Serve spreads them over both replicas
        list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, **GREEDY), prompts))
    m = _metrics(app_url)
    replicas = {s["replica"] for s in _replica_snapshots()}
    assert set(m["moray:num_requests_running"]) == replicas and len(replicas) == 2
    assert set(m["moray:kv_cache_usage_perc"]) == replicas
    assert m["moray:server_replicas"][None] == 2
    assert m["moray:generation_tokens_total"][None] - before["moray:generation_tokens_total"][None] == 8 * 8
    assert m["moray:request_success_total"][None] - before["moray:request_success_total"][None] == 8
    assert m["moray:time_to_first_token_seconds_count"][None] - \
        before["moray:time_to_first_token_seconds_count"][None] == 8
    snaps = _replica_snapshots()
    assert all(s["counters"]["moray:generation_tokens"] > 0 for s in snaps)  # both served some
    assert sum(s["counters"]["moray:generation_tokens"] for s in snaps) == m["moray:generation_tokens_total"][None]


def _until_idle(app_url):
    """A scrape in which both replicas are idle with empty KV caches (bounded wait)."""
    for _ in range(300):
        m = _metrics(app_url)
        running, kv = m["moray:num_requests_running"], m["moray:kv_cache_usage_perc"]
        if len(running) == 2 and not any(running.values()) and not any(kv.values()):
            return m
    raise AssertionError(f"the replicas never went idle: running {running}, kv {kv}")


def test_disconnect_mid_stream_aborts_across_the_hop(client, app_url):
    before = _until_idle(app_url)
    stream = client.completions.create(model="tiny", prompt="the moray hides", max_tokens=100, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)
    stream.close()  # the ingress cancels its handle request; the replica's generator aborts the engine request
    after = _until_idle(app_url)
    generated = after["moray:generation_tokens_total"][None] - before["moray:generation_tokens_total"][None]
    assert 2 <= generated < 100
    aborted = [s["finished"].get("abort", 0) for s in _replica_snapshots()]
    assert sum(aborted) >= 1


def _replica_ids():
    """The LLM server replicas alive now (their actors are named ...#LLMServer#<replica id>)."""
    import ray

    return {a["name"].rsplit("#", 1)[-1] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and "#LLMServer#" in a["name"]}


def test_killing_one_of_two_replicas_loses_no_non_streamed_request(client):
    import ray

    first_done = threading.Event()

    def user(i):  # a client sending three requests one after another
        texts = []
        for j in range(3):
            out = client.completions.create(model="tiny", prompt=f"request {i} {j}", temperature=0, max_tokens=40,
                                            extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 40
            texts.append(out.choices[0].text)
            first_done.set()
        return texts

    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if "LLMServer" in a["name"] and a["namespace"] == "serve")
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(user, i) for i in range(6)]
        assert first_done.wait(120)
        ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)
        results = [f.result() for f in futures]  # raises if any request was lost
    assert len(results) == 6 and all(len(r) == 3 for r in results)


def test_health_is_the_apps_503_only_when_no_engine_runs(app_url):
    from ray import serve

    pause = threading.Event()
    for _ in range(900):  # Serve replaces the killed replica; wait until two run (constructed, routable)
        running = serve.status().applications["moray"].deployments["LLMServer"].replica_states.get("RUNNING", 0)
        if running == 2 and len(_replica_ids()) == 2 and httpx.get(app_url + "/health").json().get("replicas") == 2:
            break
        pause.wait(0.1)
    handle = serve.get_deployment_handle("LLMServer", app_name="moray")
    one = handle.stop_engine.remote().result()
    health = httpx.get(app_url + "/health")
    assert health.status_code == 200 and health.json()["replicas_alive"] == 1  # the other still serves
    assert one in health.json()["reason"]
    stopped = set(handle.broadcast("stop_engine").results(timeout_s=60))
    assert _replica_ids() <= stopped
    health = httpx.get(app_url + "/health")
    assert health.status_code == 503
    assert "not running" in health.json()["error"]["message"]
    refused = httpx.post(app_url + "/v1/completions", json={"model": "tiny", "prompt": "x"},
                         headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
