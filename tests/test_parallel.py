"""Every layout trains like one process: pp, ep, tp, sp, dp + ZeRO-1 alone and together (CPU, gloo).

For the same seed and data, each layout's first three steps must give the
single-process loss (and router losses, gradient norm, tokens per expert)
within 1e-4 relative, the same step-1 gradients within 1e-5 of the largest,
and the same parameters after 3 steps within 1e-5. Checkpoints saved under one
layout load under another and step 4 is the single process's step 4.
At tp > 1 the embedding, the head and the loss are vocabulary-parallel (no rank
holds whole-vocabulary logits), with sequence parallelism (sp) or without; the
planner's activation bytes for these layouts are what the ranks saved. Experts
may be whole with the expert group across tensor ranks (etp 1); gradients are
reduced in buckets during the last microbatch's backward (a spy records when
each collective starts) and, under ZeRO-1, reduce-scattered into per-rank
pieces whose optimizer state reshards like any other; selective recomputation
rebuilds attention only, or every other block.
All of it in float32; bf16 runs are tests/test_bf16.py's.

Processes are the expensive part on 2 shared cores, so there is one spawn per
world size (2, then 4, then 1: checkpoints flow in that order) running every
layout of that size in turn; tests share the spawns.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from dist_utils import (GLOBAL_BATCH, OPTIM, SEED, SEQ_LEN, batches, max_param_diff, reference_run, rel, spawn,
                        tiny_config)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS = 4  # 3 compared per layout, the 4th after loading a checkpoint
LOSS_RTOL, PARAM_ATOL = 1e-4, 1e-5
GRAD_RTOL = 1e-5  # step 1's gradients, relative to the largest one

# Every layout keeps 2 sequences per microbatch (dp 1: 4 microbatches, dp 2: 2, dp 4: 1), so one
# single-process reference serves all (see dist_utils). save/load name checkpoints.
LAYOUTS = {
    2: {
        "dp2_zero1": dict(parallel=dict(zero=1, microbatches=2), save="dp2"),
        "ep2": dict(parallel=dict(ep=2, microbatches=2, zero=1)),
        "ep2_zero0": dict(parallel=dict(ep=2, microbatches=2, zero=0)),
        "pp2": dict(parallel=dict(pp=2, microbatches=4), ramp=True),
        "pp2_gpipe": dict(parallel=dict(pp=2, microbatches=4, schedule="gpipe")),
        "pp2_interleaved": dict(parallel=dict(pp=2, microbatches=4, schedule="interleaved_1f1b", virtual_stages=2)),
        "pp2_checkpointing": dict(parallel=dict(pp=2, microbatches=4, activation_checkpointing=True)),
        "ep2_checkpointing": dict(parallel=dict(ep=2, microbatches=2, activation_checkpointing=True)),
        "tp2": dict(parallel=dict(tp=2, microbatches=4)),
        "tp2_dense_gqa": dict(parallel=dict(tp=2, microbatches=4), model=dict(n_experts=1, n_kv_heads=2)),
        # Sequence parallelism: norms, residual stream and router on 1/tp of the tokens.
        "tp2_sp": dict(parallel=dict(tp=2, microbatches=4, sequence_parallel=True), save="tp2_sp"),
        "tp2_sp_dense_gqa": dict(parallel=dict(tp=2, microbatches=4, sequence_parallel=True),
                                 model=dict(n_experts=1, n_kv_heads=2)),
        # A tied table split unevenly (321 rows: 161 + 160), recomputed blocks.
        "tp2_sp_tied_checkpointing": dict(parallel=dict(tp=2, microbatches=4, sequence_parallel=True,
                                                        activation_checkpointing=True),
                                          model=dict(tie_embeddings=True, vocab_size=321), save="tp2_sp_tied"),
        # Experts over tp x dp (etp 1): the two tensor ranks are the expert group, each expert whole.
        "tp2_sp_etp1_ep2": dict(parallel=dict(tp=2, ep=2, etp=1, microbatches=4, sequence_parallel=True,
                                              grad_bucket_mb=0.1), save="etp1_ep2"),
        # etp 1, ep 1: every tensor rank holds all experts and runs its own tokens (no exchange).
        "tp2_sp_etp1": dict(parallel=dict(tp=2, etp=1, microbatches=4, sequence_parallel=True)),
        # Buckets of ~100 KB: several reduce-scatters per step, launched during the backward; 321
        # vocabulary rows, so the embedding's ZeRO pieces are uneven (161 + 160 rows).
        "dp2_zero1_buckets": dict(parallel=dict(microbatches=2, grad_bucket_mb=0.1), model=dict(vocab_size=321),
                                  save="dp2_vocab321"),
        "dp2_zero0_buckets": dict(parallel=dict(microbatches=2, zero=0, grad_bucket_mb=0.1),
                                  model=dict(vocab_size=321)),
        "dp2_no_overlap": dict(parallel=dict(microbatches=2, grad_bucket_mb=0.1, overlap_grad_reduce=False)),
        # Selective recomputation: attention only, or every other block.
        "tp2_sp_recompute_attention": dict(parallel=dict(tp=2, microbatches=4, sequence_parallel=True,
                                                         activation_checkpointing=True, recompute="attention")),
        "ep2_recompute_every2": dict(parallel=dict(ep=2, microbatches=2, activation_checkpointing=True,
                                                   recompute_every=2, grad_bucket_mb=0.1)),
    },
    4: {
        "pp2_ep2": dict(parallel=dict(pp=2, ep=2, microbatches=2), load="dp2", save="pp2_ep2", nan_drill=True),
        "pp2_tp2": dict(parallel=dict(pp=2, tp=2, microbatches=4), load="dp2"),
        "tp2_ep2": dict(parallel=dict(tp=2, ep=2, microbatches=2), reload_full=True),
        # Two copies of each expert shard (edp 2): expert gradients summed over edp, divided by dp.
        "dp4_ep2": dict(parallel=dict(ep=2, microbatches=1), save="dp4_ep2"),
        # 2 KV heads over 4 tensor ranks: each keeps both, uses the one its 2 query heads share.
        "tp4_gqa": dict(parallel=dict(tp=4, microbatches=4), model=dict(n_heads=8, n_kv_heads=2)),
        "pp2_tp2_sp": dict(parallel=dict(pp=2, tp=2, microbatches=4, sequence_parallel=True), load="tp2_sp"),
        # Capacity drops decided over the whole sequence although each tensor rank routes its half.
        "tp2_sp_ep2_capacity": dict(parallel=dict(tp=2, ep=2, microbatches=2, sequence_parallel=True),
                                    model=dict(capacity_factor=1.0), save="tp2_sp_ep2_capacity"),
        # An expert group of all 4 ranks (ep 4 over tp 2 x dp 2), ZeRO pieces over dp x tp for the norms;
        # resumes tp2_sp's checkpoint, whose experts were split by columns over tp.
        "tp2_dp2_ep4_etp1": dict(parallel=dict(tp=2, ep=4, etp=1, microbatches=2, sequence_parallel=True,
                                               grad_bucket_mb=0.1), save="etp1_ep4", load="tp2_sp"),
        # Expert copies over edp 2 (ep 2 across tp): resumes the 2-rank etp-1 checkpoint.
        "tp2_dp2_ep2_etp1": dict(parallel=dict(tp=2, ep=2, etp=1, microbatches=2, sequence_parallel=True,
                                               grad_bucket_mb=0.1), load="etp1_ep2"),
        # 1F1B and dp: each stage reduces in its last microbatch's backward; interleaved: two stages a rank.
        "pp2_dp2_buckets": dict(parallel=dict(pp=2, microbatches=2, grad_bucket_mb=0.1), load="dp2"),
        "pp2_dp2_interleaved": dict(parallel=dict(pp=2, microbatches=2, schedule="interleaved_1f1b",
                                                  virtual_stages=2, grad_bucket_mb=0.1)),
    },
    1: {
        "single": dict(parallel=dict(microbatches=4), load="pp2_ep2"),
        "single_from_dp4_ep2": dict(parallel=dict(microbatches=4), load="dp4_ep2"),
        "single_tied_vocab321": dict(parallel=dict(microbatches=4), model=dict(tie_embeddings=True, vocab_size=321),
                                     load="tp2_sp_tied"),
        "single_capacity": dict(parallel=dict(microbatches=4), model=dict(capacity_factor=1.0),
                                load="tp2_sp_ep2_capacity"),
        "single_from_etp1_ep4": dict(parallel=dict(microbatches=4), load="etp1_ep4"),
        "single_vocab321": dict(parallel=dict(microbatches=4), model=dict(vocab_size=321), load="dp2_vocab321"),
    },
}
WORLD_ORDER = (2, 4, 1)
WORLD_OF = {name: world for world, layouts in LAYOUTS.items() for name in layouts}


# ---------------------------------------------------------------- in the spawned processes


def _engine(rank: int, world: int, spec: dict):
    from moray.parallel import ParallelConfig, ParallelDims, TrainEngine

    pcfg = ParallelConfig(**spec["parallel"])
    dims = ParallelDims.from_config(pcfg, world)
    return TrainEngine(tiny_config(**spec.get("model", {})), pcfg, dims, rank, "cpu", seed=SEED, **OPTIM)


def _share(engine, tokens: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the global batch: dp rank i gets the i-th contiguous slice."""
    n = tokens.shape[0] // engine.dims.dp
    return tokens[engine.coords.dp * n:(engine.coords.dp + 1) * n]


def _nan_drill(engine, tokens: torch.Tensor) -> dict:
    """A step whose embeddings are NaN (how the chaos drill poisons one): skipped on every rank,
    weights untouched; the next step trains normally."""
    before = engine.full_state_dict()
    hooks = [m.register_forward_hook(lambda mod, inp, out: out * float("nan"))
             for part in engine.model_parts for m in part.modules() if isinstance(m, torch.nn.Embedding)]
    poisoned = engine.step(tokens)
    for h in hooks:
        h.remove()
    unchanged = all(torch.equal(v, engine.full_state_dict()[k]) for k, v in before.items())
    after = engine.step(tokens)
    return {"skipped": poisoned["skipped"], "unchanged": unchanged, "next_skipped": after["skipped"],
            "next_loss": after["loss"]}


def _whole(engine, grads: bool = False) -> dict:
    """full_state_dict named as the single process names it: a tied head is the table (checked)."""
    out = engine.full_state_dict(grads=grads)
    if engine.model_cfg.tie_embeddings:
        assert torch.equal(out.pop("output.weight"), out["tok_embeddings.weight"])
    return out


def _head_widths(engine) -> list:
    """The last dimension of every output the head produced (its logits), recorded by a hook."""
    widths: list = []
    for part in engine.model_parts:
        if part.output is not None:
            part.output.register_forward_hook(lambda m, args, out: widths.append(out.shape[-1]))
    return widths


LAUNCHES: list = []  # (exchanges data, launched while the backward ran) per bucket launch, in the spawned ranks


def _spy_on_bucket_launches() -> None:
    from moray.parallel import grad_reduce
    from moray.parallel.engine import _in_backward

    inner = grad_reduce.Bucket.launch

    def launch(self, group):
        LAUNCHES.append((self.n > 1, _in_backward()))
        return inner(self, group)
    grad_reduce.Bucket.launch = launch


def _run_layout(rank: int, world: int, spec: dict, data, ckpt_root: Path) -> dict:
    import torch.distributed.checkpoint as dcp

    engine = _engine(rank, world, spec)
    widths = _head_widths(engine)
    LAUNCHES.clear()
    outs = [engine.step(_share(engine, data[0]))]
    grads = _whole(engine, grads=True)
    outs += [engine.step(_share(engine, b)) for b in data[1:3]]
    res = {"outs": outs, "memory": engine.memory_report(), "bubble": engine.bubble_fraction,
           "launches": list(LAUNCHES),
           "n_params": len(engine.named_parameters()), "stage": engine.coords.pp, "tp_rank": engine.coords.tp,
           "logits_widths": sorted(set(widths)),
           "head_rows": [p.output.weight.shape[0] for p in engine.model_parts if p.output is not None],
           "buffer_bytes": sum(b.untyped_storage().nbytes() for p in engine.model_parts for b in p.buffers())}
    params = _whole(engine)
    if rank == 0:
        res.update(params=params, grads=grads)
    if spec.get("save"):
        dcp.save(engine.state_dict(), checkpoint_id=str(ckpt_root / spec["save"]))
    if spec.get("nan_drill"):
        res["nan_drill"] = _nan_drill(engine, _share(engine, data[3]))
    if spec.get("ramp"):  # the batch-size ramp: bigger microbatches, then the old size again
        bigger = torch.cat([data[3], data[3]])
        res["ramp"] = [engine.step(_share(engine, b)) for b in (bigger, data[3])]
    if spec.get("reload_full"):  # whole tensors in, this rank's shards taken out of them
        fresh = _engine(rank, world, spec)
        fresh.load_state_dict({f"model.{k}": v for k, v in params.items()}, strict=False)
        res["reload_full_equal"] = all(torch.equal(v, params[k]) for k, v in _whole(fresh).items())
    if spec.get("load"):  # a fresh engine of this layout, from another layout's step-3 checkpoint
        engine = _engine(rank, world, spec)
        sd = engine.state_dict()
        dcp.load(sd, checkpoint_id=str(ckpt_root / spec["load"]))
        engine.load_state_dict(sd)
        resumed = {"outs": [engine.step(_share(engine, data[3]))]}
        params = _whole(engine)
        if rank == 0:
            resumed["params"] = params
        res["resumed"] = resumed
    return res


def _world_worker(rank: int, world: int, data, ckpt_root: str) -> dict:
    _spy_on_bucket_launches()
    return {name: _run_layout(rank, world, spec, data, Path(ckpt_root)) for name, spec in LAYOUTS[world].items()}


# ---------------------------------------------------------------- fixtures and checks


@pytest.fixture(scope="module")
def data():
    return batches(STEPS, GLOBAL_BATCH)


@pytest.fixture(scope="module")
def reference(data):
    """name -> the single-process run of that layout's model (memoised per model)."""
    runs = {}

    def for_layout(name: str):
        overrides = LAYOUTS[WORLD_OF[name]][name].get("model", {})
        key = tuple(sorted(overrides.items()))
        if key not in runs:
            runs[key] = reference_run(tiny_config(**overrides), data)
        return runs[key]

    return for_layout


@pytest.fixture(scope="module")
def run_layout(tmp_path_factory, data):
    """name -> [rank 0's results, rank 1's, ...] for that layout; one spawn per world size, after
    the worlds whose checkpoints it loads."""
    ckpt_root = tmp_path_factory.mktemp("parallel_ckpt")

    @functools.lru_cache(maxsize=None)
    def run_world(world: int):
        for before in WORLD_ORDER[:WORLD_ORDER.index(world)]:
            run_world(before)
        return spawn(_world_worker, world, data, str(ckpt_root))

    return lambda name: [r[name] for r in run_world(WORLD_OF[name])]


def check_matches(per_rank, reference, label: str, steps=(0, 1, 2)) -> dict:
    """The same report on every rank; loss, router stats, grad norm and tokens per expert as one
    process; then parameters (and step-1 gradients when given)."""
    first = per_rank[0]
    for r in per_rank[1:]:
        assert r["outs"] == first["outs"], f"{label}: ranks report different results"
    report = {"loss": 0.0}
    for out, i in zip(first["outs"], steps):
        want = reference["steps"][i]
        assert out["skipped"] is False and out["num_tokens"] == GLOBAL_BATCH * SEQ_LEN
        for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
            assert rel(out[key], want[key]) < LOSS_RTOL, (label, i, key, out[key], want[key])
        assert out["tokens_per_expert"] == want["tokens_per_expert"], (label, i)
        report["loss"] = max(report["loss"], rel(out["loss"], want["loss"]))
    report["param"] = max_param_diff(first["params"], reference["params"][steps[-1]])
    assert report["param"] < PARAM_ATOL, (label, report)
    if first.get("grads") is not None:  # step 1's averaged, clipped gradients, before Adam rescales them
        scale = max(g.abs().max().item() for g in reference["grads"][0].values())
        report["grad"] = max_param_diff(first["grads"], reference["grads"][0]) / scale
        assert report["grad"] < GRAD_RTOL, (label, report)
    print(f"{label}: " + ", ".join(f"max {k} diff {v:.1e}" for k, v in report.items()))
    return report


EQUIVALENT = [name for world in WORLD_ORDER for name in LAYOUTS[world]]


@pytest.mark.parametrize("name", EQUIVALENT)
def test_layout_matches_single_process(name, run_layout, reference):
    check_matches(run_layout(name), reference(name), name)


@pytest.mark.parametrize("name,source", [("pp2_ep2", "dp2_zero1"), ("pp2_tp2", "dp2_zero1"),
                                         ("single", "pp2_ep2"), ("single_from_dp4_ep2", "dp4_ep2"),
                                         ("pp2_tp2_sp", "tp2_sp"), ("single_tied_vocab321", "tp2_sp_tied_checkpointing"),
                                         ("single_capacity", "tp2_sp_ep2_capacity"),
                                         ("tp2_dp2_ep2_etp1", "tp2_sp_etp1_ep2"), ("pp2_dp2_buckets", "dp2_zero1"),
                                         ("single_from_etp1_ep4", "tp2_dp2_ep4_etp1"),
                                         ("single_vocab321", "dp2_zero1_buckets"), ("tp2_dp2_ep4_etp1", "tp2_sp")])
def test_checkpoint_loads_across_layouts(name, source, run_layout, reference):
    """Saved after step 3 under `source`, loaded by a fresh engine of `name`: its step 4 is the
    single process's step 4 (weights and AdamW state both moved across the layouts)."""
    assert LAYOUTS[WORLD_OF[source]][source]["save"] == LAYOUTS[WORLD_OF[name]][name]["load"]
    check_matches([r["resumed"] for r in run_layout(name)], reference(name), f"{source} -> {name}", steps=(3,))


def test_pipeline_follows_a_batch_size_ramp(run_layout):
    """Stages have static shapes and are rebuilt for each new microbatch size: a step with twice
    the batch, then one with the usual batch, both run."""
    ramp = run_layout("pp2")[0]["ramp"]
    assert [o["num_tokens"] for o in ramp] == [2 * GLOBAL_BATCH * SEQ_LEN, GLOBAL_BATCH * SEQ_LEN]
    assert all(not o["skipped"] and o["loss"] < 6.5 for o in ramp)


def test_whole_weights_load_into_sharded_layout(run_layout):
    assert all(r["reload_full_equal"] for r in run_layout("tp2_ep2"))


def test_nonfinite_step_is_skipped_on_every_rank(run_layout):
    drills = [r["nan_drill"] for r in run_layout("pp2_ep2")]
    for d in drills:
        assert d["skipped"] is True and d["unchanged"] is True
        assert d["next_skipped"] is False and d["next_loss"] == drills[0]["next_loss"] < 10


def test_memory_report_and_bubble(run_layout):
    for r in run_layout("pp2"):
        mem = r["memory"]
        assert mem["params"] > 0 and mem["grads"] == mem["params"]
        assert mem["optimizer"] == 2 * mem["params"] + 4 * r["n_params"]  # m, v and a float32 step each
        assert mem["activations_peak"] > 0
        assert mem["total_peak"] == mem["params"] + mem["grads"] + mem["optimizer"] + mem["activations_peak"]
        assert r["bubble"] == pytest.approx(1 / 5)  # (p - 1) / (m + p - 1) with p 2, m 4
        assert 0.0 <= r["outs"][-1]["bubble_measured"] < 1.0
    # ZeRO-1 splits the AdamW state over the two dp ranks; activation checkpointing keeps block inputs only.
    zero = [r["memory"]["optimizer"] for r in run_layout("dp2_zero1")]
    full = 2 * run_layout("dp2_zero1")[0]["memory"]["params"]
    assert all(z < full for z in zero) and abs(sum(zero) - full) < 0.01 * full
    assert run_layout("pp2_checkpointing")[0]["memory"]["activations_peak"] < \
        run_layout("pp2")[0]["memory"]["activations_peak"]


TENSOR_PARALLEL = [name for name in EQUIVALENT if LAYOUTS[WORLD_OF[name]][name]["parallel"].get("tp", 1) > 1]


@pytest.mark.parametrize("name", TENSOR_PARALLEL)
def test_no_rank_holds_whole_vocabulary_logits(name, run_layout):
    """The head is split over the vocabulary as torch.chunk splits it: every rank with the head
    produced logits of its own rows only, and the rows of the tensor ranks add up to the vocabulary."""
    spec = LAYOUTS[WORLD_OF[name]][name]
    vocab, tp = tiny_config(**spec.get("model", {})).vocab_size, spec["parallel"]["tp"]
    heads = [r for r in run_layout(name) if r["head_rows"]]
    assert heads and len(heads) % tp == 0
    rows = {r["tp_rank"]: r["head_rows"][0] for r in heads}
    assert sum(rows.values()) == vocab and rows[0] == -(-vocab // tp)
    for r in heads:
        assert r["logits_widths"] == [rows[r["tp_rank"]]], (name, r["logits_widths"])


# Layouts whose routing is the same on every rank (no ep: a rank's expert rows do not depend on the
# router's balance), so the planner's per-token count is exact.
PLANNED = ["tp2", "tp2_dense_gqa", "tp2_sp", "tp2_sp_dense_gqa", "tp2_sp_tied_checkpointing", "pp2_tp2",
           "pp2_tp2_sp", "tp4_gqa", "tp2_sp_etp1", "tp2_sp_recompute_attention"]


@pytest.mark.parametrize("name", PLANNED)
def test_planner_counts_the_activations_each_rank_saved(name, run_layout):
    """moray plan's activation bytes for the rank's stage against the saved-tensor peak of its first
    steps. The meter also sees the rotary tables (buffers, saved by attention), which the planner
    leaves out, and a few bytes per layer that do not grow with tokens: within 0.2% once the tables
    are taken off. Checkpointing's recomputed block is invisible to the CPU meter (see memory.py)."""
    from moray.parallel import ParallelConfig, ParallelDims
    from moray.platform.planner.memory import estimate_memory

    spec = LAYOUTS[WORLD_OF[name]][name]
    pcfg = ParallelConfig(**spec["parallel"])
    dp = ParallelDims.from_config(pcfg, WORLD_OF[name]).dp
    for r in run_layout(name):
        est = estimate_memory(tiny_config(**spec.get("model", {})), pcfg, dp=dp, stage=r["stage"],
                              micro_batch_size=GLOBAL_BATCH // dp // pcfg.num_microbatches, seq_len=SEQ_LEN,
                              dtype="float32")
        planned = est.activations_bytes - est.recompute_bytes
        measured = r["memory"]["activations_peak"] - r["buffer_bytes"]
        assert abs(measured / planned - 1) < 2e-3, (name, r["stage"], measured, planned)
        # The planner holds the fullest rank: tensor rank 0 has the most vocabulary rows.
        weights = r["memory"]["params"]
        assert weights == est.weights_bytes if r["tp_rank"] == 0 else weights <= est.weights_bytes, (name, weights)


def test_sequence_parallelism_saves_activations(run_layout):
    """Same model and batch: the norms, residual stream and routing on half the tokens."""
    plain = max(r["memory"]["activations_peak"] for r in run_layout("tp2"))
    sp = max(r["memory"]["activations_peak"] for r in run_layout("tp2_sp"))
    assert sp < 0.85 * plain, (sp, plain)


# Layouts whose buckets exchange data, several per step (100 KB buckets).
OVERLAPPED = ["dp2_zero1_buckets", "dp2_zero0_buckets", "tp2_sp_etp1_ep2", "ep2_recompute_every2", "tp2_dp2_ep4_etp1",
              "tp2_dp2_ep2_etp1", "pp2_dp2_buckets", "pp2_dp2_interleaved"]


@pytest.mark.parametrize("name", OVERLAPPED)
def test_gradient_reduction_overlaps_the_backward(name, run_layout):
    """Every bucket's collective starts from a gradient hook while the last microbatch's backward
    still runs (and the results above show none started before its gradients were final)."""
    for r in run_layout(name):
        launched = [in_backward for exchanges, in_backward in r["launches"] if exchanges]
        assert len(launched) >= 3 * 2 and all(launched), (name, launched)


def test_without_overlap_every_bucket_waits_for_the_backward(run_layout):
    for r in run_layout("dp2_no_overlap"):
        launched = [in_backward for exchanges, in_backward in r["launches"] if exchanges]
        assert len(launched) >= 3 * 2 and not any(launched)


def test_zero1_keeps_a_share_of_the_state_and_selective_recompute_keeps_more_than_full(run_layout):
    """ZeRO-1's reduce-scatter leaves each dp rank half the optimizer state (bucketed or not); on
    the same layout, recomputing attention only keeps more activations than recomputing blocks."""
    for name in ("dp2_zero1", "dp2_zero1_buckets"):
        zero = [r["memory"]["optimizer"] for r in run_layout(name)]
        full = [r["memory"]["optimizer"] for r in run_layout("dp2_zero0_buckets")]
        assert all(abs(z / f - 0.5) < 0.01 for z, f in zip(zero, full)), (name, zero, full)
    attention = max(r["memory"]["activations_peak"] for r in run_layout("tp2_sp_recompute_attention"))
    block = max(r["memory"]["activations_peak"] for r in run_layout("tp2_sp_tied_checkpointing"))
    plain = max(r["memory"]["activations_peak"] for r in run_layout("tp2_sp"))
    assert block < attention < plain, (block, attention, plain)
