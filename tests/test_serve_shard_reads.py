"""Each rank of a serving gang reads only its own shard of the weights, from every kind of source.

The same weights saved four ways: a `moray convert`-style directory, a Hugging Face Mixtral
directory, a training checkpoint saved by one process (every tensor one DCP chunk: the case where
DCP's own reader would load whole tensors) and one saved by a tp 2 training run (attention rows
and expert columns in two chunks each, a layout unlike the serving ones). For every rank of
pp 2 x ep 2, tp 2 and tp 2 x ep 2, the rank's stage is built as the gang builds it (stage_cut ->
materialise, in one process: the groups only matter to the forward pass), and spies on the real
readers count what comes off the files:

- safetensors: every tensor safe_open hands out (get_tensor whole, get_slice[...] a region);
- DCP: every byte read from a checkpoint's data files (a counting wrapper on the file streams).

Each rank must read about its own parameters' bytes (exactly, for safetensors), well under its
stage's tensors read whole (what a rank read before), and every parameter must equal the
whole model's tensor cut to the rank's shard (sharding.local_view). The logits through real
gangs are tests/test_serve_stages_dist.py's and tests/test_serve_gang.py's.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import filesystem as dcp_fs

from dist_utils import spawn
from moray.model import ModelConfig, build_model
from moray.model import safetensors_io
from moray.model.hf import save_hf_dir
from moray.model.safetensors_io import save_moray_dir
from moray.parallel.serving_build import ServeLayout, stage_cut, stage_layers
from moray.parallel.sharding import local_view, param_specs
from moray.platform.weights import open_weights
from moray.serve.engine.loader import materialise

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Experts are most of the bytes (as in any MoE), so a rank that read other experts would show.
MODEL = dict(vocab_size=320, d_model=128, n_layers=4, n_heads=4, n_kv_heads=1, head_dim=32, ffn_hidden=512,
             mlp="swiglu", n_experts=4, top_k=2, max_seq_len=64, init_std=0.1)
LAYOUTS = {"pp2xep2": ServeLayout(pp=2, ep=2), "tp2": ServeLayout(tp=2), "tp2xep2": ServeLayout(tp=2, ep=2)}
SOURCES = ("moray", "hf", "ckpt-whole", "ckpt-tp2")


def _write_run(run_dir: Path, parallel: dict) -> None:
    from moray.platform.config import build_config

    cfg = build_config({"model": MODEL, "parallel": parallel,
                        "train": {"run_name": run_dir.name, "runs_dir": str(run_dir.parent), "seq_len": 16}})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())


def _train_and_save(rank: int, world: int, run_dir: str, parallel: dict):
    """One TrainEngine step under `parallel`, saved by CheckpointStore; the whole weights (rank 0)."""
    from moray.parallel import ParallelConfig, ParallelDims, TrainEngine
    from moray.platform.checkpoint import CheckpointStore

    pcfg = ParallelConfig(**parallel)
    engine = TrainEngine(ModelConfig(**MODEL), pcfg, ParallelDims.from_config(pcfg, world), rank, "cpu", seed=7)
    engine.step(torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(1)))
    store = CheckpointStore(f"{run_dir}/checkpoints", keep=1, rank=rank, world_size=world, async_save=False)
    store.save(1, engine.state_dict(), extra={"step": 1})
    store.close()
    full = engine.full_state_dict()
    return full if rank == 0 else None


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_reads")
    _write_run(root / "ckpt-tp2", {"tp": 2, "microbatches": 1})
    tp2_weights = spawn(_train_and_save, 2, str(root / "ckpt-tp2"), {"tp": 2, "microbatches": 1})[0]
    _write_run(root / "ckpt-whole", {"microbatches": 1})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        weights = _train_and_save(0, 1, str(root / "ckpt-whole"), {"microbatches": 1})
    finally:
        dist.destroy_process_group()
    cfg = ModelConfig(**MODEL)
    save_moray_dir(root / "moray", cfg, weights)
    save_hf_dir(root / "hf", cfg, weights)
    return {"root": root, "cfg": cfg, "weights": {"moray": weights, "hf": weights, "ckpt-whole": weights,
                                                  "ckpt-tp2": tp2_weights}}


# ---------------------------------------------------------------- spies on the real readers


class _CountingSlice:
    def __init__(self, inner, counter):
        self.inner, self.counter = inner, counter

    def __getitem__(self, index):
        t = self.inner[index]
        self.counter["bytes"] += t.numel() * t.element_size()
        return t

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _CountingSafeOpen:
    """safe_open as it is, counting the bytes of every tensor (or slice of one) it hands out."""

    def __init__(self, counter, path, **kw):
        self.inner, self.counter = _REAL_SAFE_OPEN(path, **kw), counter

    def get_tensor(self, name):
        t = self.inner.get_tensor(name)
        self.counter["bytes"] += t.numel() * t.element_size()
        return t

    def get_slice(self, name):
        return _CountingSlice(self.inner.get_slice(name), self.counter)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.inner, name)


_REAL_SAFE_OPEN = safetensors_io.safe_open
_REAL_CREATE_STREAM = dcp_fs.FileSystem.create_stream


class _CountingStream:
    """A file stream as it is, counting the bytes read from it."""

    def __init__(self, f, counter):
        self.f, self.counter = f, counter

    def read(self, n=-1):
        data = self.f.read(n)
        self.counter["bytes"] += len(data)
        return data

    def readinto(self, b):
        n = self.f.readinto(b)
        self.counter["bytes"] += n or 0
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.fixture
def bytes_read(monkeypatch):
    """{"bytes": n}: what safetensors handed out plus what was read from DCP data files (.distcp;
    the .metadata index is not the weights, and DCP reads it on every load)."""
    counter = {"bytes": 0}
    monkeypatch.setattr(safetensors_io, "safe_open", lambda path, **kw: _CountingSafeOpen(counter, path, **kw))

    from contextlib import contextmanager

    @contextmanager
    def create_stream(fs, path, mode):
        with _REAL_CREATE_STREAM(fs, path, mode) as f:
            yield _CountingStream(f, counter) if str(path).endswith(".distcp") else f

    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", create_stream)
    return counter


# ---------------------------------------------------------------- the tests


def _stage_whole_bytes(cfg: ModelConfig, weights: dict, layout: ServeLayout, stage: int) -> int:
    """What reading the stage's tensors whole costs: the old way, every expert of every layer."""
    layers = stage_layers(cfg, layout.pp)[stage]
    keep = {n for n in weights if n.startswith("layers.") and int(n.split(".")[1]) in layers}
    keep |= {"tok_embeddings.weight"} if stage == 0 else set()
    keep |= {"norm.weight", "output.weight"} if stage == layout.pp - 1 else set()
    return sum(weights[n].numel() * weights[n].element_size() for n in keep)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_rank_reads_only_its_shard(sources, bytes_read, source, name):
    layout, cfg = LAYOUTS[name], sources["cfg"]
    full = sources["weights"][source]
    src = open_weights(str(sources["root"] / source))
    for rank in range(layout.world_size):
        before = bytes_read["bytes"]
        model = materialise(src, None, "cpu", stage_cut(cfg, layout, rank))
        got = bytes_read["bytes"] - before
        c = layout.coords(rank)
        own, n_tensors = 0, 0
        for fqn, (p, spec) in param_specs([model], layout.dims()).items():
            assert torch.equal(p, local_view(full[fqn], spec, layout.dims(), c)), (source, name, rank, fqn)
            own += p.numel() * p.element_size()
            n_tensors += 1
        whole = _stage_whole_bytes(cfg, full, layout, c.pp)
        print(f"{source:>10} {name:>8} rank {rank}: read {got / 1024:7.1f} KiB, holds {own / 1024:7.1f} KiB, "
              f"its stage whole {whole / 1024:7.1f} KiB")
        if source in ("moray", "hf"):
            assert got == own, (rank, got, own)  # get_slice hands out exactly the shard
        else:  # + per stored chunk read from, its pickle and zip directory (~5 KiB; at most 2 chunks here)
            assert own <= got <= 1.02 * own + n_tensors * 10 * 1024, (rank, got, own)
        assert got < 0.7 * whole, (rank, got, whole)  # not the stage's layers whole


def test_a_last_stage_reads_its_tied_head_from_the_embedding(tmp_path, bytes_read):
    """Tied embeddings are stored once, as the embedding: the last stage of pp 2 (which has no
    embedding) reads that tensor for its head, and only once."""
    cfg = ModelConfig(**{**MODEL, "tie_embeddings": True})
    full = build_model(cfg, seed=5).state_dict()
    save_moray_dir(tmp_path / "tied", cfg, full)
    src = open_weights(str(tmp_path / "tied"))
    layout = ServeLayout(pp=2)
    last = materialise(src, None, "cpu", stage_cut(cfg, layout, 1))
    assert last.tok_embeddings is None and torch.equal(last.output.weight, full["tok_embeddings.weight"])
    held = sum(p.numel() * p.element_size() for p in last.parameters())
    assert bytes_read["bytes"] == held
