"""The OpenAI endpoint without Ray: the FastAPI app of moray/serve/openai/api.py over a real
LLMServer and engine (a tiny random MoE loaded from disk the way a checkpoint is), behind
a real uvicorn on 127.0.0.1, driven by the official `openai` client and raw httpx.

Streams add up to the non-streamed answers, usage counts are right, seeds reproduce,
concurrent greedy requests give what they give one by one; every bad input is a 4xx with
OpenAI's error object and the server stays healthy; keys, the queue bound (429), a client
that disconnects mid-stream (its KV blocks freed), metrics and health."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import ServerThread, save_tiny_model

from moray.platform.config import ServeConfig
from moray.serve.openai.api import build_api
from moray.serve.openai.auth import APIKeys
from moray.serve.server import LLMServer

SERVE = dict(dtype="float32", kv_cache_blocks=96, kv_block_size=16, max_num_seqs=8, max_batch_tokens=256,
             model_name="tiny", max_n=4, max_request_bytes=64 * 1024, max_tokens_default=16)
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("serve_api") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    srv = LLMServer.from_path(str(model_dir), ServeConfig(**SERVE))
    yield srv
    srv.engine.shutdown()


@pytest.fixture(scope="module")
def http(server):
    with ServerThread(build_api(server, server.serve, keys=APIKeys([]))) as st:
        yield st


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url=http.url + "/v1", api_key="unused", max_retries=0)


def _idle(server) -> bool:
    core = server.engine.core
    return core.kv.usage == 0 and core.scheduler.num_running == 0 and core.scheduler.num_waiting == 0


def _wait_idle(server) -> None:
    done = threading.Event()
    for _ in range(1000):  # bounded: the engine frees an aborted request on its next turn
        if _idle(server) and server.in_flight == 0:
            return
        done.wait(0.01)
    raise AssertionError(f"the engine still holds requests: kv usage {server.engine.core.kv.usage}, "
                         f"in flight {server.in_flight}")


# ---------------------------------------------------------------- answers


def test_completion_text_and_usage(client, server):
    prompt = "the moray hides"
    out = client.completions.create(model="tiny", prompt=prompt, **GREEDY)
    (choice,) = out.choices
    n_prompt = len(server.tokenizer.encode(prompt))
    assert choice.finish_reason == "length" and choice.index == 0 and out.object == "text_completion"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    again = client.completions.create(model="tiny", prompt=server.tokenizer.encode(prompt), **GREEDY)
    assert again.choices[0].text == choice.text  # token ids in, the same answer out


def test_streams_add_up_to_the_answer_and_end_with_done(client, http):
    for kind in ("completion", "chat"):
        if kind == "completion":
            kw = dict(model="tiny", prompt="def f(x):", **GREEDY)
            whole = client.completions.create(**kw)
            chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            expected = whole.choices[0].text
        else:
            kw = dict(model="tiny", messages=[{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hi"}], **GREEDY)
            whole = client.chat.completions.create(**kw)
            chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            expected = whole.choices[0].message.content
        assert text == expected
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["length"]
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    raw = httpx.post(http.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3,
                                                         "stream": True})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_chat_template_uses_the_role_tokens_and_stops_at_end(client, server):
    from moray.serve.openai.protocol import ChatCompletionRequest
    from moray.serve.openai.serving import prepare_chat

    tok = server.tokenizer
    req = ChatCompletionRequest(model="tiny", messages=[{"role": "developer", "content": "be brief"},
                                                        {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    job = prepare_chat(req, tok, server.limits)
    assert job.prompts[0] == tok.encode_chat([{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert job.prompts[0][-1] == tok.role_ids["assistant"]
    assert {tok.end_id, tok.eos_id} <= set(job.params.stop_token_ids)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=1.0,
                                         seed=3, n=4, max_tokens=40)
    for choice in out.choices:  # special tokens never reach the text
        assert not any(s in choice.message.content for s in ("<|end|>", "<|eos|>", "<|assistant|>", "<|user|>"))


def test_n_and_seed_reproduce(client):
    kw = dict(model="tiny", prompt="the reef", n=3, temperature=1.0, max_tokens=10, seed=11,
              extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice draws its own tokens
    other = client.completions.create(**{**kw, "seed": 12})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    assert a.usage.completion_tokens == 30
    streamed = {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in a.choices]


def test_batch_prompts_give_one_choice_group_each(client):
    one = [client.completions.create(model="tiny", prompt=p, **GREEDY).choices[0].text for p in ("ab", "the moray")]
    both = client.completions.create(model="tiny", prompt=["ab", "the moray"], **GREEDY)
    assert [c.index for c in both.choices] == [0, 1] and [c.text for c in both.choices] == one


def test_stop_strings_cut_the_text_streamed_or_not(client):
    text = client.completions.create(model="tiny", prompt="the moray", **GREEDY).choices[0].text
    assert len(text) >= 6
    stop = text[3:5]
    expected = text[:text.find(stop)]
    kw = dict(model="tiny", prompt="the moray", temperature=0, max_tokens=12, stop=["zzzz", stop])
    out = client.completions.create(**kw)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, "stop")
    assert "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices) == expected


def test_logprobs(client):
    out = client.completions.create(model="tiny", prompt="the moray", logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert all(x <= 0 for x in lp.token_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                          top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 12
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))


def test_concurrent_greedy_requests_equal_one_by_one(client):
    prompts = ["a", "the moray hides in the reef", "def f(x):\n    return", "night", "small fish " * 4, "x = 1"]
    alone = [client.completions.create(model="tiny", prompt=p, **GREEDY).choices[0].text for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, **GREEDY)
                                 .choices[0].text, prompts))
    assert together == alone


def test_models(client):
    (card,) = client.models.list().data
    assert card.id == "tiny" and card.max_model_len == 128


# ---------------------------------------------------------------- bad input

LONG = list(range(5, 5 + 200))  # 200 token ids: more than the 128-token context
BAD = [
    ("malformed JSON", dict(content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"}),
     400, None),
    ("not an object", dict(json=["tiny"]), 400, None),
    ("not JSON at all", dict(content=b"model=tiny", headers={"content-type": "text/plain"}), 400, None),
    ("unknown model", dict(json={"model": "gpt-9", "prompt": "x"}), 404, "model"),
    ("no prompt", dict(json={"model": "tiny"}), 400, "prompt"),
    ("wrong type: temperature", dict(json={"model": "tiny", "prompt": "x", "temperature": "hot"}), 400, "temperature"),
    ("wrong type: max_tokens as text", dict(json={"model": "tiny", "prompt": "x", "max_tokens": "10"}), 400,
     "max_tokens"),
    ("wrong type: n float", dict(json={"model": "tiny", "prompt": "x", "n": 1.5}), 400, "n"),
    ("wrong type: prompt", dict(json={"model": "tiny", "prompt": {"text": "x"}}), 400, "prompt"),
    ("wrong type: stream", dict(json={"model": "tiny", "prompt": "x", "stream": "yes"}), 400, "stream"),
    ("prompt longer than the context", dict(json={"model": "tiny", "prompt": LONG}), 400, "prompt"),
    ("max_tokens beyond the context", dict(json={"model": "tiny", "prompt": "x", "max_tokens": 500}), 400,
     "max_tokens"),
    ("negative temperature", dict(json={"model": "tiny", "prompt": "x", "temperature": -0.5}), 400, "temperature"),
    ("n above the limit", dict(json={"model": "tiny", "prompt": "x", "n": 5}), 400, "n"),
    ("n x prompts above the limit", dict(json={"model": "tiny", "prompt": ["a", "b", "c"], "n": 2}), 400, "n"),
    ("zero max_tokens", dict(json={"model": "tiny", "prompt": "x", "max_tokens": 0}), 400, "max_tokens"),
    ("top_p zero", dict(json={"model": "tiny", "prompt": "x", "top_p": 0}), 400, "top_p"),
    ("logprobs above 20", dict(json={"model": "tiny", "prompt": "x", "logprobs": 21}), 400, "logprobs"),
    ("token id outside the vocabulary", dict(json={"model": "tiny", "prompt": [1, 99999]}), 400, "prompt"),
    ("empty prompt", dict(json={"model": "tiny", "prompt": ""}), 400, "prompt"),
    ("empty prompt list", dict(json={"model": "tiny", "prompt": []}), 400, "prompt"),
    ("echo", dict(json={"model": "tiny", "prompt": "x", "echo": True}), 400, "echo"),
    ("five stop strings", dict(json={"model": "tiny", "prompt": "x", "stop": list("abcde")}), 400, "stop"),
    ("stream_options without stream", dict(json={"model": "tiny", "prompt": "x", "stream": False,
                                                 "stream_options": {"include_usage": True}}), 400, None),
    ("presence_penalty out of range", dict(json={"model": "tiny", "prompt": "x", "presence_penalty": 3}), 400,
     "presence_penalty"),
    ("logit_bias", dict(json={"model": "tiny", "prompt": "x", "logit_bias": {"5": 1.0}}), 400, "logit_bias"),
    ("body over the size limit", dict(json={"model": "tiny", "prompt": "x" * 70_000}), 413, None),
]
BAD_CHAT = [
    ("no messages", dict(json={"model": "tiny", "messages": []}), 400, "messages"),
    ("unknown role", dict(json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}), 400,
     "messages.0.role"),
    ("image content", dict(json={"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}), 400, "messages.0.content"),
    ("tools", dict(json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                         "tools": [{"type": "function", "function": {"name": "f"}}]}), 400, "tools"),
    ("top_logprobs without logprobs", dict(json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                 "top_logprobs": 2}), 400, None),
    ("max_completion_tokens beyond the context", dict(json={"model": "tiny", "max_completion_tokens": 1000,
                                                            "messages": [{"role": "user", "content": "x"}]}), 400,
     "max_tokens"),
]


def _assert_error(resp: httpx.Response, status: int, param) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["type"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


@pytest.mark.parametrize("case", BAD + BAD_CHAT, ids=[c[0] for c in BAD + BAD_CHAT])
def test_bad_input_is_a_4xx_with_the_error_object(http, case):
    name, request, status, param = case
    path = "/v1/chat/completions" if case in BAD_CHAT else "/v1/completions"
    for stream in (False, True):
        req = dict(request)
        if stream and isinstance(req.get("json"), dict) and "stream" not in req["json"]:
            req["json"] = {**req["json"], "stream": True}
        _assert_error(httpx.post(http.url + path, **req), status, param)


def test_routes_and_methods_that_do_not_exist(http, client):
    _assert_error(httpx.get(http.url + "/v1/completions"), 405, None)
    assert _assert_error(httpx.get(http.url + "/v2/nothing"), 404, None)["code"] == "not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    assert err.value.status_code == 400 and err.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")
    assert httpx.get(http.url + "/health").status_code == 200  # all of that, and still healthy


def test_fuzzed_request_bodies_never_give_a_5xx(http, server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(-3, 3, allow_nan=False),
                        st.text(max_size=4))
    values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=3), scalars,
                                                                              max_size=2))
    keys = ["model", "prompt", "messages", "n", "temperature", "top_p", "top_k", "seed", "stop", "max_tokens",
            "logprobs", "top_logprobs", "stream", "stream_options", "presence_penalty", "frequency_penalty", "echo",
            "ignore_eos", "stop_token_ids", "min_p", "best_of", "max_completion_tokens"]
    body = st.fixed_dictionaries({"model": st.sampled_from(["tiny", "tiny", "other"])},
                                 optional={k: values for k in keys[1:]})
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]),
                                     "content": st.one_of(st.text(max_size=8), scalars)})
    chat_body = body.flatmap(lambda b: st.lists(message, max_size=3).map(lambda m: {**b, "messages": m}))

    with httpx.Client(base_url=http.url, timeout=60) as h:
        @settings(max_examples=40, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(st.one_of(body.map(lambda b: ("/v1/completions", b)), chat_body.map(lambda b: ("/v1/chat/completions", b))))
        def check(case):
            path, payload = case
            resp = h.post(path, json=payload)
            assert resp.status_code < 500, (payload, resp.text)
            if resp.status_code >= 400:
                assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
            elif payload.get("stream") is True:
                assert resp.text.rstrip().endswith("data: [DONE]")
            else:
                json.loads(resp.text)["choices"]

        check()
        assert h.get("/health").status_code == 200
    _wait_idle(server)


# ---------------------------------------------------------------- keys, overload, disconnects


def test_api_keys(server, tmp_path, monkeypatch, caplog):
    key_file = tmp_path / "keys"
    key_file.write_text("# ops keys\nsekret-from-file\n\n")
    monkeypatch.setenv("MORAY_API_KEYS", "sekret-a, sekret-b")
    keys = APIKeys.load(str(key_file))
    assert len(keys) == 3 and "sekret" not in repr(keys)
    with pytest.raises(ValueError, match="no such file"):
        APIKeys.load(str(tmp_path / "missing"))
    with ServerThread(build_api(server, server.serve, keys=keys)) as st:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sekret-a"},
                        {"Authorization": "Bearer"}):
            err = _assert_error(httpx.post(st.url + "/v1/completions", json=body, headers=headers), 401, None)
            assert err["code"] == "invalid_api_key"
        # 401 before anything else about the request: a malformed body or an unknown route too
        _assert_error(httpx.post(st.url + "/v1/completions", content=b"{", headers={"content-type":
                                                                                     "application/json"}), 401, None)
        _assert_error(httpx.get(st.url + "/v1/nothing"), 401, None)
        _assert_error(httpx.get(st.url + "/v1/models"), 401, None)
        for key in ("sekret-a", "sekret-b", "sekret-from-file"):
            ok = httpx.post(st.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
        assert httpx.get(st.url + "/health").status_code == 200 and httpx.get(st.url + "/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=st.url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=st.url + "/v1", api_key="sekret-b", max_retries=0)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
    # Mounted under a prefix (a Serve route_prefix arrives as root_path): /v1 is guarded there too
    with ServerThread(build_api(server, server.serve, keys=keys), root_path="/moray") as st:
        _assert_error(httpx.get(st.url + "/v1/models"), 401, None)
        assert httpx.get(st.url + "/v1/models", headers={"Authorization": "Bearer sekret-a"}).status_code == 200
        assert httpx.get(st.url + "/health").status_code == 200
    assert "sekret" not in caplog.text


def test_past_the_queue_bound_a_429_with_retry_after(server, model_dir):
    small = LLMServer(server.engine, ServeConfig(**{**SERVE, "max_num_seqs": 1, "max_queue": 1,
                                                    "retry_after_s": 3}))
    long = {"model": "tiny", "prompt": "the moray", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with ServerThread(build_api(small, small.serve, keys=APIKeys([]))) as st, httpx.Client(base_url=st.url) as h:
        with h.stream("POST", "/v1/completions", json=long) as a, h.stream("POST", "/v1/completions", json=long) as b:
            assert a.status_code == b.status_code == 200
            refused = h.post("/v1/completions", json={**long, "stream": False})
            err = _assert_error(refused, 429, None)
            assert refused.headers["retry-after"] == "3" and err["code"] == "queue_full"
            _assert_error(h.post("/v1/completions", json=long), 429, None)  # a stream too, with its status line
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0).completions.create(
                    model="tiny", prompt="x", max_tokens=2)
        _wait_idle(small)  # both streams closed early: aborted, their places free again
        assert h.post("/v1/completions", json={**long, "stream": False, "max_tokens": 2}).status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_kv_blocks(client, server, http):
    _wait_idle(server)
    before = server.engine.core.stats.generation_tokens
    stream = client.completions.create(model="tiny", prompt="the moray hides in the reef", max_tokens=100,
                                       stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)
    core = server.engine.core
    assert core.kv.usage > 0 and core.scheduler.num_running == 1 and server.in_flight == 1
    stream.close()  # the client goes away with ~97 tokens to go
    _wait_idle(server)
    assert core.stats.generation_tokens - before < 100  # it did not run to the end in the background
    metrics = {s.name: s.value for f in text_string_to_metric_families(httpx.get(http.url + "/metrics").text)
               for s in f.samples if not s.labels.get("finished_reason") or s.labels["finished_reason"] == "abort"}
    assert metrics["moray:kv_cache_usage_perc"] == 0 and metrics["moray:request_success_total"] >= 1


# ---------------------------------------------------------------- metrics and health


def test_metrics_have_vllms_names_under_moray(client, http):
    client.completions.create(model="tiny", prompt="the moray", **GREEDY)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(http.url + "/metrics").text)}
    for name in ("moray:num_requests_running", "moray:num_requests_waiting", "moray:kv_cache_usage_perc",
                 "moray:prefix_cache_queries", "moray:prefix_cache_hits", "moray:prompt_tokens",
                 "moray:generation_tokens", "moray:num_preemptions", "moray:request_success",
                 "moray:spec_decode_num_drafts", "moray:spec_decode_num_draft_tokens",
                 "moray:spec_decode_num_accepted_tokens", "moray:time_to_first_token_seconds",
                 "moray:inter_token_latency_seconds", "moray:e2e_request_latency_seconds",
                 "moray:request_queue_time_seconds"):
        assert name in families, name
    samples = {s.name: s for f in families.values() for s in f.samples}
    assert samples["moray:time_to_first_token_seconds_count"].value >= 1
    assert samples["moray:inter_token_latency_seconds_count"].value >= 11
    assert samples["moray:generation_tokens_total"].value >= 12
    assert samples["moray:kv_cache_usage_perc"].labels == {"model_name": "tiny"}


def test_replicas_merge_into_one_apps_metrics(client, server):
    """What the Serve ingress answers for several replicas (moray/serve/app.py), on this engine's
    real snapshots: counters and histograms summed, gauges one per replica, and the counters of a
    replica that went away kept, so no sum ever goes down."""
    import asyncio

    from moray.serve.openai.metrics import ReplicaTotals, render

    client.completions.create(model="tiny", prompt="the moray", **GREEDY)
    snap = asyncio.run(server.metrics_snapshot())
    a, b = {**snap, "replica": "a"}, {**snap, "replica": "b"}

    def scrape(snapshots, live):
        return {(s.name, s.labels.get("replica")): s.value
                for f in text_string_to_metric_families(render(snapshots, live)) for s in f.samples
                if s.labels.get("finished_reason") in (None, "length")}

    totals = ReplicaTotals(forget_after_s=60)
    both = scrape(totals.update([a, b], now=0.0), [a, b])
    one = snap["counters"]["moray:generation_tokens"]
    assert both[("moray:generation_tokens_total", None)] == 2 * one > 0
    assert both[("moray:time_to_first_token_seconds_count", None)] == 2 * sum(snap["histograms"][
        "moray:time_to_first_token_seconds"][0])
    assert {r for (name, r) in both if name == "moray:kv_cache_usage_perc"} == {"a", "b"}
    assert both[("moray:server_replicas", None)] == 2
    gone = scrape(totals.update([b], now=10.0), [b])  # a stopped answering: its counters stay in the sums
    assert gone[("moray:generation_tokens_total", None)] == 2 * one
    assert {r for (name, r) in gone if name == "moray:kv_cache_usage_perc"} == {"b"}
    later = scrape(totals.update([b], now=100.0), [b])  # folded into one retired entry, still counted
    assert later[("moray:generation_tokens_total", None)] == 2 * one and set(totals.last) == {"b", "retired"}


def test_health_is_503_when_the_engine_or_its_gang_is_dead(model_dir, server, monkeypatch):
    with ServerThread(build_api(server, server.serve, keys=APIKeys([]))) as st:
        assert httpx.get(st.url + "/health").json()["status"] == "ok"
        monkeypatch.setattr(server.engine.core.executor, "health", lambda: {"alive": False, "reason": "stage 1 died"},
                            raising=False)
        assert "stage 1 died" in _assert_error(httpx.get(st.url + "/health"), 503, None)["message"]
        _assert_error(httpx.post(st.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}), 503, None)
        monkeypatch.undo()
        assert httpx.get(st.url + "/health").status_code == 200

    doomed = LLMServer.from_path(str(model_dir), ServeConfig(**SERVE))
    with ServerThread(build_api(doomed, doomed.serve, keys=APIKeys([]))) as st:
        c = openai.OpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0)
        stream = iter(c.completions.create(model="tiny", prompt="x", max_tokens=100, stream=True,
                                           extra_body={"ignore_eos": True}))
        next(stream)
        doomed.stop_engine()
        with pytest.raises(openai.APIError, match="engine"):  # the stream ends with an error event
            for _ in stream:
                pass
        _assert_error(httpx.get(st.url + "/health"), 503, None)
        _assert_error(httpx.post(st.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}), 503, None)
        _assert_error(httpx.post(st.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "stream": True}),
                      503, None)


def test_the_serve_config_file_and_the_job_refuse_mistakes_by_name(tmp_path):
    import subprocess
    import sys

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from moray.platform.config import ConfigError, load_config
    from moray.serve.app import AppArgs

    raw = yaml.safe_load(open("configs/serve-tiny.yaml"))
    ServeDeploySchema.model_validate(raw)  # what `serve run` / `serve deploy` check
    (app,) = raw["applications"]
    args = AppArgs.model_validate(app["args"])
    assert load_config(None, args.overrides).serve.max_queue == 32
    with pytest.raises(ConfigError, match="serve.max_que: unknown key"):
        load_config(None, ["serve.max_que=3"])
    run = subprocess.run([sys.executable, "jobs/serve.py", "--checkpoint", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "no such directory" in run.stderr
