"""The training worker in this process (a gloo group of one, no Ray): the batch ramp,
exact resumption and the NaN policies, quickly and without a cluster."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from moray.actors.train_worker import TrainingWorker
from moray.platform.config import load_config
from moray.platform.runlog import RunDir


@pytest.fixture()
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _cfg(tmp_path, data_dir, name, *extra):
    return load_config("configs/tiny.yaml", [
        f"train.runs_dir={tmp_path}", f"train.run_name={name}", f"data.dir={data_dir}",
        "parallel.pp=1", "parallel.ep=1", "parallel.microbatches=2", "cluster.num_workers=1",
        "train.micro_batch_size=2", "train.warmup_steps=2", "train.checkpoint_every=3", *extra])


def _run(cfg, resume="auto"):
    worker = TrainingWorker(cfg, rank=0, world_size=1, resume=resume)
    worker.run()
    return worker


def test_batch_ramp_grows_the_batch_in_whole_rounds(group, tmp_path, data_dir):
    # One round = dp 1 x micro-batch 2 x 2 microbatches = 4 sequences of 128 tokens.
    cfg = _cfg(tmp_path, data_dir, "ramp", "train.max_steps=8", "train.batch_tokens_start=512",
               "train.batch_tokens=2048", "train.batch_ramp_tokens=4096", "train.loggers=[tensorboard]")
    _run(cfg)
    metrics = RunDir(str(tmp_path), "ramp").read_metrics()
    seqs = [m["batch_sequences"] for m in metrics]
    assert seqs[0] == 4 and seqs[-1] == 16
    assert all(a <= b for a, b in zip(seqs, seqs[1:])) and all(s % 4 == 0 for s in seqs)
    # train.loggers: TensorBoard holds the same per-step values as metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "ramp" / "tensorboard"))
    tb.Reload()
    assert [(e.step, e.value) for e in tb.Scalars("batch_sequences")] == [(m["step"], m["batch_sequences"]) for m in metrics]
    assert [e.value for e in tb.Scalars("loss")] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)


def test_resume_is_exact_mid_ramp(group, tmp_path, data_dir):
    ramp = ["train.batch_tokens_start=512", "train.batch_tokens=2048", "train.batch_ramp_tokens=4096"]
    whole = _run(_cfg(tmp_path, data_dir, "whole", "train.max_steps=6", *ramp))
    _run(_cfg(tmp_path, data_dir, "halves", "train.max_steps=3", *ramp))
    resumed = _run(_cfg(tmp_path, data_dir, "halves", "train.max_steps=6", *ramp))
    a, b = whole.engine.full_state_dict(), resumed.engine.full_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.tokens_seen == whole.tokens_seen
    assert resumed.sampler.state_dict() == whole.sampler.state_dict()
    assert any(e["event"] == "restart" and e["step"] == 3 for e in RunDir(str(tmp_path), "halves").read_events())


def test_on_nan_halt_stops_without_saving_the_bad_state(group, tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, "halt", "train.max_steps=6", "train.chaos.nan_at_step=4", "train.on_nan=halt")
    worker = _run(cfg)
    assert worker.halted and worker.step == 4
    events = RunDir(str(tmp_path), "halt").read_events()
    assert [e["step"] for e in events if e["event"] == "halt"] == [4]
    assert not any(e["event"] == "finish" for e in events)
    assert worker.store.latest_step() == 3  # the last good checkpoint, none after the NaN


def test_init_from_starts_a_fresh_run_from_another_runs_weights(group, tmp_path, data_dir):
    source = _run(_cfg(tmp_path, data_dir, "source", "train.max_steps=3"))
    cfg = _cfg(tmp_path, data_dir, "finetune", "train.max_steps=3", f"train.init_from={tmp_path / 'source' / 'checkpoints'}")
    from moray.platform.controller import Controller

    cfg = Controller(cfg).cfg  # the driver pins init_from to the checkpoint `latest` names
    assert cfg.train.init_from.endswith("step_0000003")
    worker = TrainingWorker(cfg, rank=0, world_size=1)
    worker._restore()
    a, b = source.engine.full_state_dict(), worker.engine.full_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert worker.step == 0 and worker.tokens_seen == 0  # weights only: a new run, a fresh optimizer
    start = [e for e in RunDir(str(tmp_path), "finetune").read_events() if e["event"] == "start"][-1]
    assert start["init_from"]["path"] == cfg.train.init_from


def test_a_float32_checkpoint_resumes_in_bfloat16_with_exact_master_weights(group, tmp_path, data_dir):
    f32 = _run(_cfg(tmp_path, data_dir, "dtype_switch", "train.max_steps=3"))
    weights = f32.engine.full_state_dict()
    worker = TrainingWorker(_cfg(tmp_path, data_dir, "dtype_switch", "train.max_steps=4", "train.dtype=bfloat16"),
                            rank=0, world_size=1)
    worker._restore()  # the float32 checkpoint has no master weights: they come from its float32 weights
    assert worker.step == 3
    state = worker.engine.optimizer.owned_state()
    for fqn, p in worker.engine.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p.data, weights[fqn].to(torch.bfloat16)), fqn
        assert torch.equal(state[fqn]["master"], weights[fqn]), fqn
