"""StageRunner (moray/parallel/serving.py) in real gloo processes against the in-process engine.

A tiny Mixtral-like model (MQA, 4 experts top-2) is saved as a moray directory; a mixed
multi-step workload (a prompt cut into chunks, decodes, a speculative-style short chunk with
logits at every token, a long prefill, a batch-1 decode that leaves an ep rank with no
tokens) runs through ModelExecutor (the reference) and through the gang at pp 2 x ep 2,
tp 2 x ep 2, tp 2 and pp 2. Every step's logits, their argmax and the expert counts must agree; each rank
must hold only its stage, experts and shard, with exactly the bytes stage_report and the
planner's serve_stages model.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dist_utils import spawn
from moray.model import ModelConfig, build_model
from moray.model.safetensors_io import save_moray_dir
from moray.parallel.dims import LayoutError
from moray.parallel.serving import ServeLayout, StageRunner, stage_report
from moray.platform.planner.inference import serve_stages
from moray.serve.engine.executor import ModelExecutor, SeqChunk
from moray.serve.engine.loader import load_for_serving

CFG = dict(vocab_size=320, d_model=64, n_layers=4, n_heads=4, n_kv_heads=1, head_dim=16, ffn_hidden=128,
           mlp="swiglu", n_experts=4, top_k=2, max_seq_len=64)
BLOCK, NUM_BLOCKS = 4, 40
TABLES = {s: list(range(8 * i, 8 * i + 8)) for i, s in enumerate("ABCD")}  # 32 tokens each


def _workload():
    g = torch.Generator().manual_seed(7)

    def toks(n):
        return torch.randint(0, CFG["vocab_size"], (n,), generator=g).tolist()

    def c(seq, tokens, start, **kw):
        return SeqChunk(tokens, start, TABLES[seq], **kw)

    return [
        [c("A", toks(7), 0, needs_logits=False), c("B", toks(3), 0)],  # a prefill chunk + a prompt
        [c("A", toks(3), 7), c("B", toks(1), 3), c("C", toks(12), 0)],  # A's last chunk, a decode, a prompt
        [c("A", toks(1), 10), c("B", toks(3), 4, num_logits=3), c("C", toks(1), 12)],  # a verify chunk
        [c("D", toks(20), 0), c("A", toks(1), 11), c("C", toks(2), 13, num_logits=2)],  # a long prefill
        [c("B", toks(1), 7)],  # batch-1 decode: ep rank 1 routes no tokens
        [c("D", toks(1), 20), c("B", toks(1), 8)],
    ]


def _config(kind: str) -> ModelConfig:
    return ModelConfig(**{**CFG, **({"n_experts": 1} if kind == "dense" else {})})


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """kind -> a moray directory: "moe" (4 experts top-2) and "dense" (the same without experts)."""
    out = {}
    for kind in ("moe", "dense"):
        d = tmp_path_factory.mktemp(kind) / "model"
        save_moray_dir(d, _config(kind), build_model(_config(kind), seed=3).state_dict())
        out[kind] = str(d)
    return out


@pytest.fixture(scope="module")
def references(model_dirs):
    out = {}
    for kind, path in model_dirs.items():
        ex = ModelExecutor(load_for_serving(path).model, NUM_BLOCKS, BLOCK)
        out[kind] = [ex.execute(chunks) for chunks in _workload()]
    return out


def _run_gang(rank: int, world_size: int, path: str, layout: ServeLayout):
    runner = StageRunner(path, None, layout, rank, NUM_BLOCKS, BLOCK)
    outs = [runner.step(chunks) for chunks in _workload()]  # no barrier: stages overlap steps
    runner.flush()
    return {"outs": outs, "stage": runner.stage, "layers": list(runner.layers), "coords": layout.coords(rank),
            "weight_bytes": runner.weight_bytes, "kv_bytes_per_token": runner.kv_bytes_per_token,
            "params": {k: v.clone() for k, v in runner.model.named_parameters()},
            "kv_shape": tuple(runner.kv_caches[0][0].shape)}


def _expected_shard(name: str, full: torch.Tensor, coords, layout: ServeLayout) -> torch.Tensor:
    """What rank `coords` must hold of the whole model's tensor `name`."""
    if ".experts.w" in name:
        el = full.shape[0] // layout.ep
        full = full[coords.ep * el:(coords.ep + 1) * el]
        dim = 1 if name.endswith("w2") else 2  # the F dim
        return full.chunk(layout.tp, dim)[coords.tp]
    if name.endswith(("attention.wq.weight", "feed_forward.w1.weight", "feed_forward.w3.weight")):
        return full.chunk(layout.tp, 0)[coords.tp]  # column parallel: (out, in) split by out
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return full.chunk(layout.tp, 1)[coords.tp]  # row parallel
    return full  # wk/wv (MQA: one KV head, whole on every tensor rank), norms, router, embedding, head


def _check_layout(ranks, reference, layout: ServeLayout, model_dir: str, cfg: ModelConfig):
    full = load_for_serving(model_dir).model.state_dict()
    n_stages = layout.pp
    # logits and argmax at every step, from the last stage's (tp 0, ep 0) rank only
    last = ranks[layout.rank_of(n_stages - 1)]
    for i, (ref, out) in enumerate(zip(reference, last["outs"])):
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5, msg=f"step {i}")
        assert torch.equal(out.logits.argmax(-1), ref.logits.argmax(-1)), f"step {i}"
    # expert counts: each stage's layers, whole over its ep group, in layer order
    for i, ref in enumerate(reference):
        if ref.expert_tokens is None:  # dense
            assert all(r["outs"][i].expert_tokens is None for r in ranks if r["outs"][i] is not None)
            continue
        got = torch.cat([ranks[layout.rank_of(s)]["outs"][i].expert_tokens for s in range(n_stages)])
        assert torch.equal(got, ref.expert_tokens), f"step {i}"
    for r, res in enumerate(ranks):
        leader = res["coords"].tp == 0 and res["coords"].ep == 0
        assert all((o is not None) == leader for o in res["outs"]), r
        if leader and res["stage"] != n_stages - 1:
            assert all(o.logits is None for o in res["outs"])
    # each rank holds only its stage, experts and shard, and exactly what the models say
    report = stage_report(cfg, layout, dtype_bytes=4)
    planned = serve_stages(cfg, layout.tp, layout.pp, layout.ep, 4, 4)
    for r, res in enumerate(ranks):
        s, c = res["stage"], res["coords"]
        layers = report[s]["layers"]
        want = {k for k in full if k.startswith("layers.") and int(k.split(".")[1]) in layers}
        want |= {"tok_embeddings.weight"} if s == 0 else set()
        want |= {"norm.weight", "output.weight"} if s == n_stages - 1 else set()
        assert set(res["params"]) == want, r
        for name, t in res["params"].items():
            assert torch.equal(t, _expected_shard(name, full[name], c, layout)), (r, name)
        assert res["layers"] == layers
        assert res["kv_shape"] == (NUM_BLOCKS, BLOCK, 1, cfg.head_dim)  # MQA: one head per rank
        assert res["weight_bytes"] == report[s]["weight_bytes"] == planned[s]["weights_bytes_per_gpu"], r
        assert res["kv_bytes_per_token"] == report[s]["kv_bytes_per_token"] \
            == planned[s]["kv_cache_bytes_per_token_per_gpu"], r
        assert report[s]["n_layers"] == planned[s]["layers"]


# One spawn of 4 processes serves every case (process start-up dominates on 2 cores): the
# world-4 cases on the first process group, then two world-2 groups side by side.
# name -> (layout, model kind)
WORLD4 = {"pp2xep2": (ServeLayout(pp=2, ep=2), "moe"), "tp2xep2": (ServeLayout(tp=2, ep=2), "moe")}
PAIRS = [{"tp2": (ServeLayout(tp=2), "moe"), "tp2-dense": (ServeLayout(tp=2), "dense")},  # ranks 0-1
         {"pp2": (ServeLayout(pp=2), "moe"), "pp2-dense": (ServeLayout(pp=2), "dense")}]  # ranks 2-3
CASES = {**WORLD4, **PAIRS[0], **PAIRS[1]}


def _run_all(rank: int, world_size: int, dirs: dict, tmp: str):
    results = {name: _run_gang(rank, world_size, dirs[kind], layout) for name, (layout, kind) in WORLD4.items()}
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pair{rank // 2}", rank=rank % 2, world_size=2,
                            timeout=timedelta(seconds=120))  # dist_utils destroys it
    for name, (layout, kind) in PAIRS[rank // 2].items():
        results[name] = _run_gang(rank % 2, 2, dirs[kind], layout)
    return results


@pytest.fixture(scope="module")
def gangs(model_dirs, tmp_path_factory):
    ranks = spawn(_run_all, 4, model_dirs, str(tmp_path_factory.mktemp("pg")))
    out = {name: [r[name] for r in ranks] for name in WORLD4}
    for i, pair in enumerate(PAIRS):
        out.update({name: [r[name] for r in ranks[2 * i:2 * i + 2]] for name in pair})
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_gang_matches_in_process_engine(name, gangs, model_dirs, references):
    layout, kind = CASES[name]
    _check_layout(gangs[name], references[kind], layout, model_dirs[kind], _config(kind))


def test_layout_checks_and_report():
    cfg = ModelConfig(**CFG)
    layout = ServeLayout(pp=2, tp=2, ep=2)
    assert layout.world_size == 8
    assert layout.dims().describe() == {"world_size": 8, "pp": 2, "dp": 2, "tp": 2, "ep": 2}
    assert [layout.coords(r) for r in (0, 1, 2, 5)] == [layout.dims().coords(r) for r in (0, 1, 2, 5)]
    assert (layout.coords(6).pp, layout.coords(6).ep, layout.coords(6).tp) == (1, 1, 0)
    assert layout.rank_of(1, ep=1, tp=0) == 6
    for bad, why in [(ServeLayout(ep=3), "ep 3 must divide n_experts 4"), (ServeLayout(pp=5), "5 pipeline stages"),
                     (ServeLayout(tp=3), "tp 3 must divide")]:
        with pytest.raises(LayoutError, match=why):
            bad.validate(cfg)
    report = stage_report(cfg, layout, dtype_bytes=2)
    planned = serve_stages(cfg, 2, 2, 2, 2, 2)
    assert [r["layers"] for r in report] == [[0, 1], [2, 3]]
    assert [r["weight_bytes"] for r in report] == [p["weights_bytes_per_gpu"] for p in planned]
    assert [r["kv_bytes_per_token"] for r in report] == [p["kv_cache_bytes_per_token_per_gpu"] for p in planned]
    for pp in range(1, 5):  # the runner's split (partition_layers) is the planner's (stage_layer_counts)
        assert [r["n_layers"] for r in stage_report(cfg, ServeLayout(pp=pp))] == \
            [p["layers"] for p in serve_stages(cfg, 1, pp)]
    # ep shrinks the experts only; the whole gang holds every expert once per tp shard
    whole = stage_report(cfg, ServeLayout(), dtype_bytes=2)[0]["params"]
    assert sum(r["params"] for r in stage_report(cfg, ServeLayout(pp=2, ep=2))) < whole
