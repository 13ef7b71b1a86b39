"""The serving gang on a real Ray cluster: RayExecutor (moray/serve/engine/ray_executor.py) over
StageGang (moray/actors/serve_gang.py) against the in-process ModelExecutor and EngineCore.

One `ray.cluster_utils.Cluster` for the module (a head with no CPUs, as the driver's node, and
three 2-CPU worker nodes), and at most one gang alive at a time: every gang start costs
seconds of process start-up and torch import on this 2-core machine, so each gang serves
several assertions (three starts: tp 2, pp 2 x ep 2 rebuilt after each of three faults, then pp 2 x
ep 2 over a compiled graph). The node-removal test runs before that one (it leaves two nodes, just
enough for a pp 2 x ep 2 gang).

Checked: every step's logits (allclose, argmax equal) and expert counts of a mixed workload at
pp 2 x ep 2 and at tp 2; two steps in flight at pp 2 equal the same steps run one at a time;
greedy generation through EngineCore equals the in-process engine token for token, also with a
stage actor killed mid-generation; a stage actor killed (ray.kill) or its node removed while a
step is in flight -> ExecutorFailure, an event with the cause and the seconds, and the rebuilt
gang gives the reference outputs again. Last, on the cluster the node removal left: the
compiled-graph data path (transport="cgraph") gives the same outputs and sees a killed rank as
Ray's actor death, mid-step and between steps.
"""

from __future__ import annotations

import time

import pytest
import torch

from moray.model import ModelConfig, build_model
from moray.model.safetensors_io import save_moray_dir
from moray.parallel.serving import ServeLayout, stage_report
from moray.serve.engine.config import EngineConfig
from moray.serve.engine.core import EngineCore
from moray.serve.engine.executor import ExecutorFailure, ModelExecutor, SeqChunk
from moray.serve.engine.loader import load_for_serving
from moray.serve.engine.sampling import SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CFG = dict(vocab_size=320, d_model=64, n_layers=4, n_heads=4, n_kv_heads=1, head_dim=16, ffn_hidden=128,
           mlp="swiglu", n_experts=4, top_k=2, max_seq_len=64)
BLOCK, NUM_BLOCKS = 4, 64
TABLES = {s: list(range(8 * i, 8 * i + 8)) for i, s in enumerate("ABCDEF")}  # 32 tokens each


def _toks(g, n):
    return torch.randint(0, CFG["vocab_size"], (n,), generator=g).tolist()


def _workload():
    """Prefill chunks, whole prompts, decodes, verify-style short chunks (num_logits > 1)."""
    g = torch.Generator().manual_seed(7)

    def c(seq, n, start, **kw):
        return SeqChunk(_toks(g, n), start, TABLES[seq], **kw)

    return [
        [c("A", 7, 0, needs_logits=False), c("B", 3, 0)],  # a prefill chunk + a prompt
        [c("A", 3, 7), c("B", 1, 3), c("C", 12, 0)],  # A's last chunk, a decode, a prompt
        [c("A", 1, 10), c("B", 3, 4, num_logits=3), c("C", 1, 12)],  # a verify chunk
        [c("D", 20, 0), c("A", 1, 11), c("C", 2, 13, num_logits=2)],  # a long prefill
        [c("B", 1, 7)],  # batch 1: ep rank 1 routes no tokens
        [c("D", 1, 20), c("B", 1, 8)],
    ]


def _pipelined_pairs():
    """Two disjoint sequences (E, F), one step each per round: what two in-flight steps carry."""
    g = torch.Generator().manual_seed(11)
    e, f = (lambda n, s, **kw: SeqChunk(_toks(g, n), s, TABLES["E"], **kw),
            lambda n, s, **kw: SeqChunk(_toks(g, n), s, TABLES["F"], **kw))
    return [([e(9, 0)], [f(6, 0)]), ([e(1, 9)], [f(3, 6, num_logits=3)]), ([e(1, 10)], [f(1, 9)])]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node: no actors there
    for _ in range(3):
        c.add_node(num_cpus=2)
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = ModelConfig(**CFG)
    d = tmp_path_factory.mktemp("tiny") / "model"
    save_moray_dir(d, cfg, build_model(cfg, seed=3).state_dict())
    return str(d)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The in-process model, and every workload step's result through ModelExecutor."""
    model = load_for_serving(model_dir, dtype=torch.float32).model
    ex = ModelExecutor(model, NUM_BLOCKS, BLOCK)
    steps = [ex.execute(chunks) for chunks in _workload()]
    pairs = [(ex.execute(a), ex.execute(b)) for a, b in _pipelined_pairs()]
    return {"model": model, "steps": steps, "pairs": pairs}


class Gangs:
    """At most one RayExecutor alive: asking for another layout shuts the current one down."""

    def __init__(self, path):
        self.path, self.name, self.executor = path, None, None

    def get(self, name: str, layout: ServeLayout, **kw):
        from moray.serve.engine.ray_executor import RayExecutor

        if self.name != name:
            self.close()
            t0 = time.perf_counter()
            self.executor = RayExecutor(self.path, ModelConfig(**CFG), layout, NUM_BLOCKS, BLOCK,
                                        dtype=torch.float32, **kw)
            print(f"\n[gang {name}] started in {time.perf_counter() - t0:.1f} s "
                  f"({self.executor.gang.start_breakdown})")
            self.name = name
        return self.executor

    def close(self):
        if self.executor is not None:
            self.executor.shutdown()
        self.name = self.executor = None


@pytest.fixture(scope="module")
def gangs(cluster, model_dir):
    g = Gangs(model_dir)
    yield g
    g.close()


def _assert_same(got, want, what: str):
    assert got.logits.shape == want.logits.shape, what
    assert torch.allclose(got.logits, want.logits, atol=1e-4, rtol=1e-4), \
        f"{what}: logits differ by {(got.logits - want.logits).abs().max():.2e}"
    assert torch.equal(got.logits.argmax(-1), want.logits.argmax(-1)), what
    assert torch.equal(got.expert_tokens, want.expert_tokens), what
    assert got.experts_touched == want.experts_touched, what


def _run_workload(ex, reference, what):
    for i, (chunks, want) in enumerate(zip(_workload(), reference["steps"])):
        _assert_same(ex.execute(chunks), want, f"{what} step {i}")


def _pause(actor, seconds: float):
    """Hold an actor's queue, so the step sent next is surely in flight when the fault comes."""
    return actor.__ray_call__.remote(lambda self: time.sleep(seconds))


# ---------------------------------------------------------------- tensor parallel, resources


def test_tp2_matches_in_process(gangs, reference, model_dir):
    """Built the user's way, LLM(path, tp=2): the serve keys make the gang; greedy text equals
    the in-process LLM's on a mixed batch, then every workload step's logits match."""
    from moray.serve.engine.llm import LLM

    gangs.close()
    kw = dict(dtype="float32", kv_cache_blocks=NUM_BLOCKS, kv_block_size=BLOCK)
    llm = LLM(model_dir, tp=2, **kw)
    gangs.name, gangs.executor = "tp2", llm.core.executor  # closed by the fixture, reused below
    g = torch.Generator().manual_seed(5)
    prompts = [_toks(g, n) for n in (3, 11, 6, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = [o.token_ids for o in LLM(model_dir, **kw).generate(prompts, params)]
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    ex = gangs.get("tp2", ServeLayout(tp=2))
    assert ex.max_inflight == 1
    _run_workload(ex, reference, "tp 2")
    nodes = {a["node_id"] for a in ex.health()["actors"]}
    assert len(nodes) == 1  # a tensor-parallel group shares a node (one bundle)


def test_a_gang_the_cluster_cannot_hold_says_what_it_needs(cluster, model_dir):
    from moray.actors.serve_gang import GangStartError, StageGang

    gang = StageGang(model_dir, ModelConfig(**CFG), ServeLayout(tp=4), NUM_BLOCKS, BLOCK, "float32")
    with pytest.raises(GangStartError, match=r"needs 4 CPU in 1 bundles .* largest with 2 CPUs"):
        gang.start()
    assert gang.pg is None and not gang.actors


# ---------------------------------------------------------------- executor level


def test_pp2_ep2_matches_in_process(gangs, reference):
    ex = gangs.get("pp2ep2", ServeLayout(pp=2, ep=2))
    assert ex.max_inflight == 2
    _run_workload(ex, reference, "pp 2 x ep 2")
    h = ex.health()
    assert h["alive"] and len(h["actors"]) == 4 and not h["events"]
    # The gang holds what the stage model says: layers, weight and KV bytes per rank.
    report = stage_report(ModelConfig(**CFG), ServeLayout(pp=2, ep=2), dtype_bytes=4)
    for a in h["actors"]:
        stage = report[a["pp"]]
        assert list(range(*a["layers"])) == stage["layers"]
        assert a["weight_bytes"] == stage["weight_bytes"] and a["kv_bytes_per_token"] == stage["kv_bytes_per_token"]
    assert ex.kv_bytes_per_token == ModelExecutor(reference["model"], 2, BLOCK).kv_bytes_per_token


def test_two_steps_in_flight_equal_sequential(gangs, reference):
    ex = gangs.get("pp2ep2", ServeLayout(pp=2, ep=2))
    for i, ((a, b), (want_a, want_b)) in enumerate(zip(_pipelined_pairs(), reference["pairs"])):
        ha, hb = ex.submit(a), ex.submit(b)  # both in the pipeline before either is collected
        _assert_same(ex.collect(ha), want_a, f"round {i} first")
        _assert_same(ex.collect(hb), want_b, f"round {i} second")
        assert len(hb.stage_seconds) == 2


def test_killed_stage_actor_mid_step_rebuilds_the_gang(gangs, reference):
    import ray

    ex = gangs.get("pp2ep2", ServeLayout(pp=2, ep=2))
    work = _workload()
    for chunks in work[:3]:
        ex.execute(chunks)
    victim = 3  # stage 1, ep 1: not the rank that returns logits; stage 1 ep 0 waits for it in an all-to-all
    assert ex.gang.wait_standby(timeout=120) == 4  # steady state: the spares have warmed up
    _pause(ex.gang.actors[victim], 1.0)
    handle = ex.submit(work[3])
    time.sleep(0.2)
    killed_at, killed_wall = time.perf_counter(), time.time()
    ray.kill(ex.gang.actors[victim])
    with pytest.raises(ExecutorFailure) as err:
        ex.collect(handle)
    assert "ray.kill" in err.value.cause and err.value.lost_kv
    event = ex.health()["events"][-1]
    assert event["rank"] == victim and event["rebuilt"] and event["rebuild_seconds"] > 0
    assert event["standbys_used"] == 4 and ex.health()["standbys"] == 4  # promoted, and replaced
    assert event["cause"] == err.value.cause and event["detected_at"] <= time.time()
    with pytest.raises(ExecutorFailure):  # a handle of the old gang is void
        ex.collect(handle)
    # The fresh gang's cache is empty: the workload again from its first prefill.
    first = ex.execute(work[0])
    print(f"\n[kill] kill -> detected {event['detected_at'] - killed_wall:.2f} s, "
          f"-> next step result {time.perf_counter() - killed_at:.1f} s "
          f"(rebuild {event['rebuild_seconds']:.1f} s: {event['breakdown']})")
    _assert_same(first, reference["steps"][0], "after rebuild step 0")
    for i, chunks in enumerate(work[1:], 1):
        _assert_same(ex.execute(chunks), reference["steps"][i], f"after rebuild step {i}")
    assert ex.health()["alive"] and ex.gang.generation == 2


# ---------------------------------------------------------------- engine level


PROMPT_LENS = [5, 17, 9, 26]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _engine_config() -> EngineConfig:
    # Small budgets: prompts arrive in prefill chunks beside other requests' decodes.
    return EngineConfig(kv_block_size=BLOCK, kv_cache_blocks=NUM_BLOCKS, max_batch_tokens=16, max_num_seqs=4,
                        enable_prefix_caching=False)


def _generate(core, on_step=None):
    g = torch.Generator().manual_seed(5)
    for i, n in enumerate(PROMPT_LENS):
        core.add_request(f"r{i}", _toks(g, n), GREEDY)
    done, steps = {}, 0
    while core.has_unfinished_requests():
        outs = core.step()
        steps += 1
        if on_step:
            on_step(steps, outs)
        done.update({o.request_id: o.token_ids for o in outs if o.finished})
    return done


@pytest.fixture(scope="module")
def engine_reference(reference):
    return _generate(EngineCore(reference["model"], ModelConfig(**CFG), _engine_config()))


def test_engine_over_the_gang_equals_in_process_even_with_a_kill(gangs, engine_reference):
    import ray

    ex = gangs.get("pp2ep2", ServeLayout(pp=2, ep=2))
    core = EngineCore(None, ModelConfig(**CFG), _engine_config(), executor=ex)
    assert _generate(core) == engine_reference

    core = EngineCore(None, ModelConfig(**CFG), _engine_config(), executor=ex)
    seen = {}

    def kill_at_step_4(step, outs):
        if step == 4:  # mid-generation: prompts prefilled, decodes running
            _pause(ex.gang.actors[2], 1.0)  # stage 1's leader; the pipeline has a step queued on it
            time.sleep(0.1)
            seen["killed_at"] = time.perf_counter()
            ray.kill(ex.gang.actors[2])
        elif "killed_at" in seen and "next_token" not in seen and any(o.outputs[0].token_ids for o in outs) \
                and core.stats.executor_failures:
            seen["next_token"] = time.perf_counter() - seen["killed_at"]

    assert _generate(core, kill_at_step_4) == engine_reference
    assert core.stats.executor_failures == 1 and core.stats.recoveries[0]["requeued"] > 0
    print(f"\n[engine kill] kill -> next token {seen.get('next_token', float('nan')):.1f} s, "
          f"recovery {core.stats.recoveries[0]}, {ex.health()['events'][-1]['breakdown']}")


# ---------------------------------------------------------------- a node lost (shrinks the cluster: only cgraph after)


def test_removed_node_rebuilds_the_gang_elsewhere(gangs, cluster, reference):
    ex = gangs.get("pp2ep2", ServeLayout(pp=2, ep=2))  # 1 CPU per actor: 4 bundles on two 2-CPU nodes
    work = _workload()
    for chunks in work[:2]:
        ex.execute(chunks)
    victim_id = ex.gang.infos[2]["node_id"]  # the node of stage 1's leader
    victim = next(n for n in cluster.worker_nodes if n.node_id == victim_id)
    _pause(ex.gang.actors[2], 1.0)
    handle = ex.submit(work[2])
    time.sleep(0.2)
    removed_at = time.perf_counter()
    cluster.remove_node(victim, allow_graceful=False)
    with pytest.raises(ExecutorFailure) as err:
        ex.collect(handle)
    event = ex.health()["events"][-1]
    assert event["node_id"] == victim_id and event["rebuilt"]
    assert victim_id not in {a["node_id"] for a in ex.health()["actors"]}
    _assert_same(ex.execute(work[0]), reference["steps"][0], "after node loss step 0")
    print(f"\n[node] removed -> next step result {time.perf_counter() - removed_at:.1f} s "
          f"(rebuild {event['rebuild_seconds']:.1f} s: {event['breakdown']}): {err.value.cause[:120]}")
    for i, chunks in enumerate(work[1:], 1):
        _assert_same(ex.execute(chunks), reference["steps"][i], f"after node loss step {i}")


# ---------------------------------------------------------------- the compiled-graph data path


def _held_stage_cls():
    """A StageActor whose compiled-graph steps can be held (set from the actor's main thread while
    the graph runs on its own thread), so a kill surely lands mid-step. Defined in a function, so
    it goes to Ray's workers by value (they cannot import this test module)."""
    from moray.actors.serve_stage import StageActor

    class Held(StageActor):
        held = 0.0

        def hold(self, seconds: float) -> None:
            self.held = seconds

        def step_handoff(self, chunks, hidden=None):
            time.sleep(self.held)
            return super().step_handoff(chunks, hidden)

    return Held


def test_compiled_graph_path_matches_and_sees_deaths_as_actor_errors(gangs, reference):
    """transport="cgraph" (moray/actors/serve_graph.py): the same logits and expert counts as the
    in-process engine, two steps in flight, and a rank killed mid-step or between steps is an
    ExecutorFailure naming the rank and Ray's ActorDiedError (no timeout), after which the rebuilt
    gang and its recompiled graph give the reference outputs again."""
    import ray

    ex = gangs.get("pp2ep2-cgraph", ServeLayout(pp=2, ep=2), transport="cgraph", actor_cls=_held_stage_cls())
    assert ex.gang.graph is not None
    _run_workload(ex, reference, "cgraph pp 2 x ep 2")
    for i, ((a, b), (want_a, want_b)) in enumerate(zip(_pipelined_pairs(), reference["pairs"])):
        ha, hb = ex.submit(a), ex.submit(b)
        _assert_same(ex.collect(ha), want_a, f"cgraph round {i} first")
        _assert_same(ex.collect(hb), want_b, f"cgraph round {i} second")
    work = _workload()
    victim = 3
    ray.get(ex.gang.actors[victim].hold.remote(2.0))
    handle = ex.submit(work[0])
    time.sleep(0.3)
    killed_at = time.perf_counter()
    ray.kill(ex.gang.actors[victim])
    with pytest.raises(ExecutorFailure) as err:
        ex.collect(handle)
    event = ex.health()["events"][-1]
    assert "ActorDiedError" in err.value.cause and "ray.kill" in err.value.cause, err.value.cause
    assert event["rank"] == victim and event["rebuilt"] and ex.gang.graph is not None
    print(f"\n[cgraph kill mid-step] -> ExecutorFailure after {time.perf_counter() - killed_at:.1f} s "
          f"(rebuild {event['rebuild_seconds']:.1f} s): {err.value.cause}")
    _run_workload(ex, reference, "cgraph after a kill mid-step")
    ray.kill(ex.gang.actors[1])  # between steps: the next step's submit or collect sees it
    time.sleep(0.5)
    with pytest.raises(ExecutorFailure) as err:
        ex.collect(ex.submit(work[0]))
    assert ex.health()["events"][-1]["rank"] == 1 and "ActorDiedError" in err.value.cause, err.value.cause
    _run_workload(ex, reference, "cgraph after a kill between steps")
