"""The real Ray Serve application, started once for the module on a fresh local Ray cluster:
ingress (FastAPI) -> two LLM server replicas -> engines, on 127.0.0.1, driven by the
official `openai` client. Completions, a stream and chat through both hops; keys; metrics;
a client that goes away mid-stream frees the KV blocks of the replica across the hop; a
replica killed under load loses no non-streamed request; engines that die turn /health 503."""

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

    root = tmp_path_factory.mktemp("serve_ray")
    model = save_tiny_model(root / "tiny")
    (root / "keys").write_text(KEY + "\n")
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
    """{sample name: (replica, value)} from one scrape (it reaches one replica)."""
    text = httpx.get(app_url + "/metrics").text
    return {s.name: (s.labels.get("replica"), s.value) for f in text_string_to_metric_families(text)
            for s in f.samples}


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
    assert m["moray:num_requests_running"][0]  # labelled by replica


def _per_replica(app_url, until):
    """{replica: {sample: value}} from scrapes until `until(view)` holds (bounded). A scrape reaches one
    replica, and Serve sends it to the less busy one: a replica still running a request is not seen."""
    view = {}
    for _ in range(300):
        m = _metrics(app_url)
        replica = m["moray:num_requests_running"][0]
        view[replica] = {name: value for name, (_, value) in m.items()}
        if until(view):
            return view
    raise AssertionError(f"replicas seen: {sorted(view)}; never {until.__doc__}")


def test_disconnect_mid_stream_aborts_across_the_hop(client, app_url):
    def both(view):
        """two replicas, both idle with empty KV caches"""
        return len(view) == 2 and all(v["moray:num_requests_running"] == 0 and v["moray:kv_cache_usage_perc"] == 0
                                      for v in view.values())

    before = _per_replica(app_url, both)
    stream = client.completions.create(model="tiny", prompt="the moray hides", max_tokens=100, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)
    stream.close()  # the ingress cancels its handle request; the replica's generator aborts the engine request
    after = _per_replica(app_url, both)
    generated = sum(after[r]["moray:generation_tokens_total"] - before[r]["moray:generation_tokens_total"]
                    for r in after)
    assert 2 <= generated < 100
    assert sum(after[r].get("moray:request_success_total", 0) for r in after) >= 1  # (finished_reason="abort")


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


def test_dead_engines_make_health_503(app_url):
    from ray import serve

    pause = threading.Event()
    for _ in range(900):  # Serve replaces the killed replica; wait until two run (constructed, routable)
        running = serve.status().applications["moray"].deployments["LLMServer"].replica_states.get("RUNNING", 0)
        if running == 2 and len(_replica_ids()) == 2:
            break
        pause.wait(0.1)
    handle = serve.get_deployment_handle("LLMServer", app_name="moray")
    stopped = set()
    for _ in range(600):  # the handle reaches one replica per call; stop every engine there is
        stopped.add(handle.stop_engine.remote().result())
        if _replica_ids() <= stopped:
            break
        pause.wait(0.05)
    assert _replica_ids() <= stopped
    health = httpx.get(app_url + "/health")
    assert health.status_code == 503
    assert "not running" in health.json()["error"]["message"]
    refused = httpx.post(app_url + "/v1/completions", json={"model": "tiny", "prompt": "x"},
                         headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
