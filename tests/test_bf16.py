"""bf16 that is bf16: TrainEngine(dtype="bfloat16") on CPU, gloo, through the real step.

What reaches the expert product, crosses the pipeline and the expert all-to-all
is bf16 (spies in the spawned ranks); the optimizer keeps fp32 master weights and
AdamW state on the parameters' device; a few bf16 steps track the float32
single-process run and the loss falls; a checkpoint round trip is exact and
either dtype's state loads into the other; the planner's bytes are the engine's.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from dist_utils import GLOBAL_BATCH, OPTIM, SEED, SEQ_LEN, batches, reference_run, rel, spawn, tiny_config
from moray.model.transformer import Transformer
from moray.parallel import ParallelConfig, ParallelDims
from moray.parallel.mixed_precision import MasterWeightAdamW, adamw_options
from moray.parallel.sharding import param_specs
from moray.parallel.zero import DataParallelOptimizer

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS = 4  # on one repeated batch, so the loss must fall every step
LOSS_RTOL = 2e-2  # bf16 against the float32 single process (measured: about 1e-4)
MEMORY_RTOL = 0.05
LAYOUTS = {"pp2": dict(pp=2, microbatches=4), "ep2": dict(ep=2, microbatches=2, zero=1),
           "tp2_sp": dict(tp=2, microbatches=4, sequence_parallel=True)}


# ---------------------------------------------------------------- in the spawned processes


def _engine(rank: int, layout: dict, dtype: str = "bfloat16"):
    from moray.parallel import TrainEngine

    pcfg = ParallelConfig(**layout)
    return TrainEngine(tiny_config(), pcfg, ParallelDims.from_config(pcfg, 2), rank, "cpu", seed=SEED,
                       dtype=dtype, **OPTIM)


def _share(engine, tokens):
    n = tokens.shape[0] // engine.dims.dp
    return tokens[engine.coords.dp * n:(engine.coords.dp + 1) * n]


def _install_spies(seen: dict) -> None:
    """Record the dtypes that reach the expert product, leave through a pipeline send and cross the
    expert all-to-all; count calls of the per-expert fallback loop."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    import moray.model.moe as moe

    def spy(owner, name, record):
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def wrapper(*args, **kwargs):
            out = inner(*args, **kwargs)
            record(args, out)
            return out
        setattr(owner, name, wrapper)

    add = lambda key, dtypes: seen.setdefault(key, set()).update(str(d) for d in dtypes)  # noqa: E731
    spy(moe, "grouped_mm", lambda a, out: add("expert_product", (a[0].dtype, a[1].dtype)))
    spy(moe, "_grouped_mm_loop", lambda a, out: add("loop_calls", ("called",)))
    spy(PipelineStage, "get_fwd_send_ops", lambda a, ops: add("pipeline_fwd_send", (o.tensor.dtype for o in ops)))
    spy(PipelineStage, "get_bwd_send_ops", lambda a, ops: add("pipeline_bwd_send", (o.tensor.dtype for o in ops)))
    # Rows travel as floats; the counts exchanged first are int64.
    spy(dist, "all_to_all_single", lambda a, out: add("all_to_all", (t.dtype for t in a[:2] if t.is_floating_point())))
    # Sequence parallelism's all-gathers and reduce-scatters (sequence shards, expert rows).
    for name in ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor"):
        if hasattr(dist, name):  # torch 2.13 has all four, 2.11 the last two
            spy(dist, name, lambda a, out: add("tp_gather_scatter", (t.dtype for t in a[:2] if t.is_floating_point())))


def _state_checks(engine) -> dict:
    """The state describes this rank's piece of each parameter (its ZeRO share, or all of it)."""
    params = dict(engine.named_parameters())
    opt = engine.optimizer
    owned = opt.owned_state()
    return {
        "param_dtypes": {str(p.dtype) for p in params.values()},
        "grad_dtypes": {str(opt.grad_piece(fqn).dtype) for fqn in params},
        "state_dtypes": {k: str(v.dtype) for st in owned.values() for k, v in st.items()},
        "state_on_param_device": all(v.device == params[fqn].device for fqn, st in owned.items() for v in st.values()),
        "param_is_rounded_master": all(torch.equal(opt.param_piece(fqn), st["master"].to(params[fqn].dtype))
                                       for fqn, st in owned.items()),
        "master_elements": sum(st["master"].numel() for st in owned.values()),
        "param_elements": sum(p.numel() for p in params.values()),
    }


def _checkpoint_round_trip(rank: int, layout: dict, engine, tokens, ckpt: Path) -> dict:
    """Saved after the steps so far; a fresh engine loads it and takes the same next step, bit for bit."""
    import torch.distributed.checkpoint as dcp

    dcp.save(engine.state_dict(), checkpoint_id=str(ckpt))
    want = engine.step(tokens)
    fresh = _engine(rank, layout)
    sd = fresh.state_dict()
    dcp.load(sd, checkpoint_id=str(ckpt))
    fresh.load_state_dict(sd)
    got = fresh.step(tokens)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 - DTensor shards
    theirs = fresh.state_dict()
    return {"loss_equal": got["loss"] == want["loss"], "grad_norm_equal": got["grad_norm"] == want["grad_norm"],
            "state_equal": all(torch.equal(local(v), local(theirs[k])) for k, v in engine.state_dict().items())}


def _cross_dtype_loads(rank: int, layout: dict, tokens) -> dict:
    """A float32 engine's state into a bf16 engine (master = the float32 weight, exactly) and back."""
    fp32 = _engine(rank, layout, "float32")
    fp32.step(tokens)
    bf16 = _engine(rank, layout)
    bf16.load_state_dict(fp32.state_dict())
    w32 = dict(fp32.named_parameters())
    owned = bf16.optimizer.owned_state()
    fp32_state = fp32.optimizer.owned_state()
    into_bf16 = (all(torch.equal(p, w32[fqn].to(torch.bfloat16)) for fqn, p in bf16.named_parameters())
                 and all(torch.equal(st["master"], fp32.optimizer.param_piece(fqn))
                         and torch.equal(st["exp_avg"], fp32_state[fqn]["exp_avg"]) for fqn, st in owned.items()))
    bf16.step(tokens)
    back = _engine(rank, layout, "float32")
    back.load_state_dict(bf16.state_dict())
    w16 = dict(bf16.named_parameters())
    into_fp32 = all(p.dtype == torch.float32 and torch.equal(p, w16[fqn].float()) for fqn, p in back.named_parameters())
    return {"fp32_into_bf16": into_bf16, "bf16_into_fp32": into_fp32}


def _worker(rank: int, world: int, data, ckpt_root: str) -> dict:
    seen: dict = {}
    _install_spies(seen)
    res = {}
    for name, layout in LAYOUTS.items():
        seen.clear()
        engine = _engine(rank, layout)
        outs = [engine.step(_share(engine, b)) for b in data]
        r = {"outs": outs, "seen": {k: sorted(v) for k, v in seen.items()}, "memory": engine.memory_report(),
             "state": _state_checks(engine), "stage": engine.coords.pp}
        if name == "ep2":
            r["round_trip"] = _checkpoint_round_trip(rank, layout, engine, _share(engine, data[0]),
                                                     Path(ckpt_root) / name)
            r["cross_dtype"] = _cross_dtype_loads(rank, layout, _share(engine, data[0]))
        res[name] = r
    return res


# ---------------------------------------------------------------- checks


@pytest.fixture(scope="module")
def data():
    return batches(1) * STEPS


@pytest.fixture(scope="module")
def ranks(data, tmp_path_factory):
    return spawn(_worker, 2, data, str(tmp_path_factory.mktemp("bf16_ckpt")))


def test_expert_product_pipeline_and_all_to_all_are_bf16(ranks):
    bf16 = ["torch.bfloat16"]
    for r in ranks:
        for name in LAYOUTS:
            seen = r[name]["seen"]
            assert seen["expert_product"] == bf16, (name, seen)
            assert "loop_calls" not in seen, f"{name}: the per-expert fallback loop ran"
    for r in ranks:  # stage 0 sends activations forward, stage 1 sends their gradients back
        seen = r["pp2"]["seen"]
        key = "pipeline_fwd_send" if r["pp2"]["stage"] == 0 else "pipeline_bwd_send"
        assert seen[key] == bf16, seen
        assert not seen.get("all_to_all"), seen  # no experts are exchanged without ep
        assert r["ep2"]["seen"]["all_to_all"] == bf16
        assert r["tp2_sp"]["seen"]["tp_gather_scatter"] == bf16


def test_weights_and_grads_are_bf16_master_and_adam_fp32(ranks):
    for r in ranks:
        for name in LAYOUTS:
            st = r[name]["state"]
            assert st["param_dtypes"] == {"torch.bfloat16"} and st["grad_dtypes"] == {"torch.bfloat16"}
            assert st["state_dtypes"] == {"master": "torch.float32", "exp_avg": "torch.float32",
                                          "exp_avg_sq": "torch.float32", "step": "torch.float32"}
            assert st["state_on_param_device"] and st["param_is_rounded_master"]
    # ZeRO-1 over dp 2: each rank keeps master copies of its pieces only (the experts, ep 2 of dp 2,
    # have one copy each: all of theirs), and the pieces of the two ranks add up to the dense part once.
    for name in ("ep2",):
        st = [r[name]["state"] for r in ranks]
        assert all(0 < s["master_elements"] < s["param_elements"] for s in st)


def test_bf16_loss_tracks_float32_and_falls(ranks, data):
    want = [s["loss"] for s in reference_run(tiny_config(), data)["steps"]]
    for name in LAYOUTS:
        got = [o["loss"] for o in ranks[0][name]["outs"]]
        assert all(not o["skipped"] for o in ranks[0][name]["outs"])
        worst = max(rel(g, w) for g, w in zip(got, want))
        print(f"{name}: bf16 {['%.5f' % g for g in got]}, float32 {['%.5f' % w for w in want]}, "
              f"max rel diff {worst:.1e}")
        assert worst < LOSS_RTOL
        assert all(b < a for a, b in zip(got, got[1:])), got


def test_checkpoint_round_trip_is_exact_and_dtypes_load_into_each_other(ranks):
    for r in ranks:
        assert r["ep2"]["round_trip"] == {"loss_equal": True, "grad_norm_equal": True, "state_equal": True}
        assert r["ep2"]["cross_dtype"] == {"fp32_into_bf16": True, "bf16_into_fp32": True}


def test_planner_counts_what_the_engine_holds(ranks):
    """moray.platform.planner.memory at bf16 against memory_report, each rank (as train_worker's
    _memory_vs_plan compares them; no activation checkpointing here, so nothing is hidden from the
    CPU meter)."""
    from moray.platform.planner.memory import estimate_memory

    for name, layout in LAYOUTS.items():
        pcfg = ParallelConfig(**layout)
        dp = ParallelDims.from_config(pcfg, 2).dp
        for r in ranks:
            mem = r[name]["memory"]
            est = estimate_memory(tiny_config(), pcfg, micro_batch_size=GLOBAL_BATCH // dp // pcfg.num_microbatches,
                                  seq_len=SEQ_LEN, dtype="bfloat16", stage=r[name]["stage"], dp=dp)
            assert mem["params"] == est.weights_bytes and mem["grads"] == est.grads_bytes, (name, mem, est)
            ratios = {"optimizer": mem["optimizer"] / est.optimizer_bytes,  # + a 4-byte step per tensor
                      "activations": mem["activations_peak"] / est.activations_bytes,
                      "total": mem["total_peak"] / est.held_bytes}  # saved tensors only: no transients
            print(f"{name} stage {r[name]['stage']}: measured / planned " +
                  ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
            assert abs(ratios["total"] - 1) < MEMORY_RTOL and abs(ratios["optimizer"] - 1) < 1e-3, (name, ratios)
            # The planner assumes balanced routing; under ep a rank runs the rows its experts were sent.
            assert abs(ratios["activations"] - 1) < 2 * MEMORY_RTOL, (name, ratios)


# ---------------------------------------------------------------- the optimizer alone


def _meta_optimizer(master_weights: bool) -> DataParallelOptimizer:
    with torch.device("meta"):
        model = Transformer(tiny_config(n_layers=1))
    if master_weights:
        model.to(torch.bfloat16)
    dims = ParallelDims(1)
    return DataParallelOptimizer(param_specs([model], dims), dims, None, dims.coords(0), lr=1e-3,
                                 betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, zero=0,
                                 master_weights=master_weights)


@pytest.mark.parametrize("master_weights", [False, True])
def test_optimizer_state_lives_on_the_parameters_device(master_weights):
    """Fused AdamW refuses a step counter on another device than its parameter's: build everything
    on 'meta' (standing in for CUDA) and look where the state went."""
    opt = _meta_optimizer(master_weights)
    params = {fqn: p for fqn, (p, _) in opt.named.items()}
    for fqn, st in opt.owned_state().items():
        for key, t in st.items():
            assert t.device == params[fqn].device, (fqn, key, t.device)
    assert adamw_options(torch.device("cuda")) == {"fused": True} and adamw_options(torch.device("cpu")) == {}


@pytest.mark.parametrize("fused", [False, True])
def test_master_weight_adamw_is_adamw_on_the_master(fused):
    """The fp32 master follows torch.optim.AdamW on fp32 copies bit for bit (the fused kernel too: it
    runs on the CPU as well), and the bf16 parameter is the rounded master."""
    torch.manual_seed(0)
    ours = [torch.randn(16, 8).bfloat16().requires_grad_(), torch.randn(8).bfloat16().requires_grad_()]
    ref = [p.detach().float().requires_grad_() for p in ours]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]  # noqa: E731
    opt, want = MasterWeightAdamW(groups(ours), **kw), torch.optim.AdamW(groups(ref), **kw)
    for _ in range(3):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.float()
        opt.step()
        want.step()
    for p, q in zip(ours, ref):
        st = opt.state[p]
        assert torch.equal(st["master"], q.detach()) and torch.equal(st["exp_avg"], want.state[q]["exp_avg"])
        assert torch.equal(p.detach(), q.detach().bfloat16()) and st["step"].item() == 3
