"""An LLM server replica whose engine runs on a gang of stage actors (serve.pp = 2), as Ray Serve
runs it: build_app reserves the gang's bundles in the replica's own placement group, the gang
is placed there (no placement group of its own), the app answers what the in-process engine
answers on the same weights, and deleting the app releases every CPU the gang held.

One Serve app for the module, behind Serve's own Python proxy (tests/test_serve_ray.py runs
HAProxy), on a local cluster of 3 logical CPUs: the replica's 0.5 and one per stage rank."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from serve_helpers import free_port, save_tiny_model

from moray.serve.app import build_app

pytestmark = [pytest.mark.ray, pytest.mark.slow]
GANG = ["serve.pp=2", "serve.cpus_per_actor=1", "serve.replica_cpus=0.5"]
SERVE = ["serve.dtype=float32", "serve.model_name=tiny", "serve.kv_cache_blocks=32", "serve.max_num_seqs=4"]


def _llm_deployment(app):
    """The LLM server deployment inside the app build_app returns (the ingress binds it)."""
    return app._bound_deployment.init_args[0]._bound_deployment


@pytest.mark.parametrize("overrides, bundles", [
    (["serve.pp=2", "serve.replica_cpus=0.5"], [{"CPU": 0.5}, {"CPU": 1.0}, {"CPU": 1.0}]),
    (["serve.tp=2", "serve.ep=2", "serve.cpus_per_actor=0.5"], [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]),
    (["serve.pp=2", "serve.replica_cpus=0"], [{"CPU": 1.0}, {"CPU": 1.0}]),  # the replica rides in bundle 0
    ([], None),  # in process: no gang, no placement group
])
def test_build_app_reserves_the_gang_with_the_replica(overrides, bundles):
    config = _llm_deployment(build_app({"checkpoint": "unused", "overrides": overrides}))._replica_config
    assert config.placement_group_bundles == bundles
    assert config.placement_group_strategy == ("PACK" if bundles else None)


@pytest.fixture(scope="module")
def gang_app(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    model = save_tiny_model(tmp_path_factory.mktemp("serve_gang") / "tiny")
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(model), "overrides": SERVE + GANG}), name="moray", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "model": model}
    serve.shutdown()
    ray.shutdown()


def _groups():
    import ray

    return [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]


def test_the_gang_lives_in_the_replicas_placement_group(gang_app):
    (group,) = _groups()  # the replica's; the gang made none of its own
    assert [b for _, b in sorted(group["bundles"].items())] == [{"CPU": 0.5}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert group["strategy"] == "PACK"
    health = httpx.get(gang_app["url"] + "/health").json()
    assert health["alive"] is True and health["replicas_alive"] == 1


def test_the_app_answers_what_the_engine_answers(gang_app):
    from moray.serve.engine import LLM, SamplingParams

    client = openai.OpenAI(base_url=gang_app["url"] + "/v1", api_key="unused", max_retries=0)
    prompts = ["the moray hides", "def f(x):"]
    got = [client.completions.create(model="tiny", prompt=p, temperature=0, max_tokens=8,
                                     extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    chunks = client.completions.create(model="tiny", prompt=prompts[0], temperature=0, max_tokens=8, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == got[0]
    llm = LLM(str(gang_app["model"]), dtype="float32", kv_cache_blocks=32)  # in this process, no gang
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert got == [llm.core.tokenizer.decode(o.token_ids, skip_special=True) for o in outs]


def test_deleting_the_app_releases_the_gang(gang_app):
    import ray
    from ray import serve

    serve.delete("moray")
    pause = threading.Event()
    for _ in range(600):  # bounded: Serve stops the replica, Ray removes its group and the gang in it
        if not _groups() and ray.available_resources().get("CPU", 0) == 3:
            break
        pause.wait(0.1)
    assert not _groups()
    assert ray.available_resources().get("CPU", 0) == 3
