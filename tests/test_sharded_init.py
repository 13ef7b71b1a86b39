"""Sharded initialisation: each rank materialises only its share, with the whole model's values.

A rank's part is built on meta, cut to its stage, experts and tensor shards,
then allocated and filled (moray/parallel/materialise.py), each weight's slice
generated without the whole weight (moray/model/init.py). Checked here, in one
process (building needs no process group):
- the slice generator gives exactly the whole tensor's values for any slice,
  dtype and piece size (torch's normal_ replayed in pieces);
- every rank of several layouts holds bit for bit the single process's weights
  (the same values as before sharded init: the per-name rule did not change);
- building a rank never holds more than 1.1x its final share, measured with
  TensorMemoryMeter (tensor_memory.py: a TorchDispatchMode counting every live
  storage), for the scaled-down gpt4 (configs/gpt4-mini.yaml) at tp 2 x pp 2 x
  ep 2, in bf16 and float32. The whole-width build it replaces peaked at 4.2x.
"""

from __future__ import annotations

import pytest
import torch

import moray.model.init as init_mod
from moray.model import build_model
from moray.model.init import generator_for, normal_
from moray.model.transformer import Transformer
from moray.parallel import ParallelConfig, ParallelDims
from moray.parallel.engine import build_model_parts
from moray.parallel.materialise import held_bytes
from moray.parallel.sharding import local_view, param_specs
from moray.parallel.tensor_memory import TensorMemoryMeter
from moray.platform.config import load_config

MINI = load_config("configs/gpt4-mini.yaml")
SEED = 1234


def _whole(shape, std=0.02, key="w", seed=SEED):
    return torch.empty(shape).normal_(0.0, std, generator=generator_for(seed, key))


@pytest.mark.parametrize("piece", [16, 48, 1 << 20])
@pytest.mark.parametrize("shape", [(7, 2), (37, 23), (5, 7, 11), (64, 48), (3, 1, 1000)])
def test_any_slice_equals_the_whole_tensors_rows(shape, piece, monkeypatch):
    """Rows [a, b) along any dim, pieces of any size (16 forces many, 1M one), tails included."""
    monkeypatch.setattr(init_mod, "MAX_PIECE", piece)
    whole = _whole(shape)
    for dim, size in enumerate(shape):
        for start, stop in {(0, size), (0, (size + 1) // 2), ((size + 1) // 2, size), (size // 3, size - size // 3)}:
            if stop <= start:
                continue
            for dtype in (torch.float32, torch.bfloat16):
                held = list(shape)
                held[dim] = stop - start
                out = normal_(torch.empty(held, dtype=dtype), 0.02, SEED, "w", (dim, start, size))
                assert torch.equal(out, whole.narrow(dim, start, stop - start).to(dtype)), (dim, start, stop, dtype)


def test_init_values_are_the_per_name_rule():
    """Sharded init changed how values are generated, not which: each weight is still N(0, std)
    from its own generator seeded by (seed, name), an expert by (seed, name#id), norms ones."""
    cfg = MINI.model
    model = build_model(cfg, seed=SEED)
    wq = "layers.1.attention.wq.weight"
    assert torch.equal(model.get_parameter(wq), _whole((cfg.d_model, cfg.d_model), cfg.init_std, wq))
    w2 = model.layers["2"].feed_forward.experts.w2
    key = "layers.2.feed_forward.experts.w2#5"
    assert torch.equal(w2[5], _whole((cfg.ffn_hidden, cfg.d_model), cfg.init_std, key))
    assert torch.equal(model.norm.weight, torch.ones(cfg.d_model))


LAYOUTS = {
    "tp2_pp2_ep2_sp": (dict(tp=2, pp=2, ep=2, sequence_parallel=True, microbatches=4), 8, {}),
    "tp2_tied_uneven": (dict(tp=2, microbatches=4), 2, dict(tie_embeddings=True, vocab_size=321)),
    "tp4_etp1_ep4_sp": (dict(tp=4, ep=4, etp=1, sequence_parallel=True, microbatches=4), 4, {}),
    "pp2_interleaved_ep2": (dict(pp=2, ep=2, schedule="interleaved_1f1b", microbatches=4), 4, {}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_rank_holds_the_single_process_weights(name):
    spec, world, model_overrides = LAYOUTS[name]
    cfg = MINI.model.__class__(**{**MINI.model.__dict__, **model_overrides})
    pcfg = ParallelConfig(**spec)
    dims = ParallelDims.from_config(pcfg, world)
    whole = dict(build_model(cfg, seed=SEED).named_parameters())
    for dtype in (torch.float32, torch.bfloat16):
        covered = set()
        for rank in range(world):
            parts = build_model_parts(cfg, pcfg, dims, rank, None, "cpu", SEED, dtype)
            for fqn, (p, ps) in param_specs(parts, dims).items():
                want = local_view(whole[fqn], ps, dims, dims.coords(rank)).to(dtype)
                assert p.dtype == dtype and torch.equal(p, want), (name, rank, fqn)
                covered.add(fqn)
            assert all(part.rope_cos.dtype == dtype for part in parts)
        assert covered == set(whole) - ({"output.weight"} if cfg.tie_embeddings else set())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_building_a_rank_never_holds_more_than_1_1x_its_share(dtype):
    """Every rank of gpt4-mini at tp 2 x pp 2 x ep 2 with sequence parallelism. The share is what
    the rank holds when built (its parameters and rotary tables); the peak counts every tensor
    created while building, the random numbers' pieces and the rotary tables' float64 included."""
    p = MINI.parallel
    dims = ParallelDims.from_config(p, MINI.world_size())
    assert (dims.tp, dims.pp, dims.ep) == (2, 2, 2)
    for rank in range(dims.world_size):
        with TensorMemoryMeter("cpu") as meter:
            parts = build_model_parts(MINI.model, p, dims, rank, None, "cpu", SEED, dtype)
        share = sum(held_bytes(part) for part in parts)
        assert meter.live == share  # the meter saw every byte the rank keeps
        print(f"rank {rank} {dtype}: peak {meter.peak:,} B = {meter.peak / share:.3f} x share {share:,} B")
        assert meter.peak <= 1.1 * share, (rank, meter.peak, share)


def test_the_meter_sees_a_whole_width_build():
    """The check above can fail: materialising a stage at whole width and slicing it afterwards
    (the build this replaced) peaks far above the share."""
    from moray.parallel.expert_parallel import apply_ep
    from moray.parallel.pipeline import keep_stage, partition_layers
    from moray.parallel.tensor_parallel import apply_tp
    from moray.parallel.vocab_parallel import apply_vocab_parallel

    cfg = MINI.model
    with TensorMemoryMeter("cpu") as meter:
        with torch.device("meta"):
            part = Transformer(cfg)
        keep_stage(part, partition_layers(cfg, 2, tp=2, sequence_parallel=True)[0], first=True, last=False)
        apply_ep(part, None, 0, 2)
        part.to_empty(device="cpu")
        part.init_weights(SEED)
        apply_tp(part, None, 0, 2, sequence_parallel=True)
        apply_vocab_parallel(part, None, 0, 2, sequence_parallel=True)
        part.to(torch.bfloat16)
    assert meter.peak > 3 * held_bytes(part)


def test_meter_counts_live_storages_once():
    with TensorMemoryMeter("cpu") as meter:
        a = torch.empty(1000)  # 4,000 bytes
        views = (a[10:20], a.view(10, 100))
        b = torch.ones(500)  # 2,000 more
        assert meter.live == 6000 and len(views) == 2
        del b
        lin = torch.nn.Linear(100, 50)  # 20,000 + 200
        x = torch.ones(8, 100, requires_grad=True)  # 3,200
        lin(x).sum().backward()  # the output and the loss are freed, the gradients kept
        torch.empty(100_000)  # 400,000 bytes, freed at once: only the peak remembers them
    assert meter.live == 4000 + 2 * 20200 + 2 * 3200  # a, the weights and their gradients, x and its gradient
    assert meter.peak == meter.live + 400_000
