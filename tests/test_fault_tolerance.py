"""Failures on a local multi-node Ray cluster: a killed worker, a lost node, a hung
worker, a crash in the middle of a checkpoint and a NaN loss. Each run goes on by
itself, the events file tells the story, and the final parameters and optimizer
state equal an uninterrupted run's bit for bit."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from moray.platform.config import load_config
from moray.platform.controller import run_pretraining
from moray.platform.runlog import RunDir

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_STEPS, EVERY = 8, 2


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver and Ray Train's controller
    for _ in range(3):  # one more than a run needs: the replacement when a node is lost
        c.add_node(num_cpus=2)
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def _cfg(root: Path, data_dir: Path, name: str, *extra: str):
    # Two workers as two pipeline stages: a failure anywhere stalls the other in a collective.
    return load_config("configs/tiny.yaml", [
        f"train.runs_dir={root}", f"train.run_name={name}", f"data.dir={data_dir}",
        f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={EVERY}", "train.keep_checkpoints=10",
        "train.warmup_steps=2", "train.max_failures=3", "train.hang_timeout_s=8",
        "parallel.pp=2", "parallel.ep=1", "cluster.num_workers=2", *extra])


def _final_state(run_dir: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run_dir / "final.pt"
    dcp_to_torch_save(str(run_dir / "checkpoints" / f"step_{MAX_STEPS:07d}"), str(out))
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def baseline_dir(cluster, data_dir, tmp_path_factory) -> Path:
    """An uninterrupted run, committed every EVERY steps."""
    return run_pretraining(_cfg(tmp_path_factory.mktemp("runs"), data_dir, "baseline")).run_dir


@pytest.fixture(scope="module")
def baseline(baseline_dir):
    return _final_state(baseline_dir)


def _assert_bitwise_equal(state: dict, ref: dict) -> None:
    tensors = [k for k, v in ref.items() if isinstance(v, torch.Tensor)]
    assert any(k.startswith("model.") for k in tensors) and any(k.startswith("optim.") for k in tensors)
    assert sorted(state) == sorted(ref)
    for k in tensors:
        assert torch.equal(state[k], ref[k]), f"{k} differs from the uninterrupted run"


def _check_story(result, what: str) -> dict:
    kinds = [e["event"] for e in result.events]
    assert kinds[-1] == "finish", kinds
    restarts = [e for e in result.events if e["event"] == "restart"]
    assert len(restarts) >= 1, kinds
    # At most one interval, plus the one step that runs while an async save is being written
    # (it commits at the next step boundary); a crash that tears a save loses that checkpoint too.
    bound = (2 * EVERY if what == "torn_checkpoint" else EVERY) + 1
    assert all(e["steps_lost"] <= bound for e in restarts), restarts
    failures = [e for e in result.events if e["event"] in ("failure", "hang", "chaos")]
    assert failures, kinds
    assert [m["step"] for m in result.metrics][-1] == MAX_STEPS - 1
    return restarts[0]


@pytest.mark.parametrize("name,chaos", [
    ("kill", ["train.chaos.kill_worker_at_step=5", "train.chaos.kill_rank=1"]),
    ("hang", ["train.chaos.hang_at_step=5", "train.chaos.hang_rank=0"]),
    ("torn_checkpoint", ["train.chaos.crash_during_checkpoint_at_step=4"]),
    ("nan_restart", ["train.chaos.nan_at_step=5", "train.on_nan=restart"]),
])
def test_run_survives_and_ends_bitwise_equal(baseline, data_dir, tmp_path, name, chaos):
    result = run_pretraining(_cfg(tmp_path, data_dir, name, *chaos))
    restart = _check_story(result, name)
    if name == "torn_checkpoint":
        # The save of step 4 died after its shards: `latest` stayed at step 2, which is where we resumed.
        assert restart["step"] == 2
        assert any(e["event"] == "chaos" and e["what"] == "crash_during_checkpoint" for e in result.events)
    else:
        assert restart["step"] == 4
    if name == "hang":
        assert any(e["event"] == "hang" for e in result.events)
    _assert_bitwise_equal(_final_state(result.run_dir), baseline)


def test_run_survives_losing_a_node(cluster, baseline, data_dir, tmp_path):
    import ray
    from ray.util.state import list_actors

    cfg = _cfg(tmp_path, data_dir, "node_lost")
    metrics = tmp_path / "node_lost" / "metrics.jsonl"

    def pull_the_plug():
        deadline = time.time() + 300
        while time.time() < deadline:
            steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()] if metrics.exists() else []
            if steps and max(steps) >= 4:
                break
            time.sleep(0.2)
        worker_nodes = {a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                                 ("state", "=", "ALIVE")])}
        victim = next(n for n in cluster.worker_nodes if n.node_id in worker_nodes)
        removed.append(victim.node_id)
        cluster.remove_node(victim, allow_graceful=False)

    removed = []
    killer = threading.Thread(target=pull_the_plug, daemon=True)
    killer.start()
    result = run_pretraining(cfg)
    killer.join(timeout=60)
    _check_story(result, "node_lost")
    assert removed and not next(n for n in ray.nodes() if n["NodeID"] == removed[0])["Alive"]
    assert any(e["event"] == "failure" and e["what"] == "worker_lost" for e in result.events)
    _assert_bitwise_equal(_final_state(result.run_dir), baseline)


def test_on_nan_skip_skips_the_step_and_goes_on(baseline, data_dir, tmp_path):
    result = run_pretraining(_cfg(tmp_path, data_dir, "nan_skip", "train.chaos.nan_at_step=3"))
    skipped = [e for e in result.events if e["event"] == "step_skipped"]
    assert [e["step"] for e in skipped] == [3]
    assert not any(e["event"] == "restart" for e in result.events)
    by_step = {m["step"]: m for m in result.metrics}
    assert by_step[3]["skipped"] and not by_step[4]["skipped"]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for s, m in by_step.items() if s != 3)


def test_past_max_failures_the_run_stops_naming_the_last_good_checkpoint(cluster, data_dir, tmp_path):
    from moray.platform.controller import RunFailed

    cfg = _cfg(tmp_path, data_dir, "doomed", "train.max_failures=1", "train.chaos.kill_worker_at_step=5",
               "train.chaos.kill_rank=1", "train.chaos.once=false")
    with pytest.raises(RunFailed) as err:
        run_pretraining(cfg)
    message = str(err.value)
    assert "the last good checkpoint is step 4" in message and "--resume auto" in message
    events = [e["event"] for e in RunDir(str(tmp_path), "doomed").read_events()]
    assert events.count("restart") == 1 and events[-1] == "gave_up"


def _restarts(result):
    return [e for e in result.events if e["event"] == "restart"]


@pytest.fixture(scope="module")
def resumed_elsewhere(baseline_dir, data_dir, tmp_path_factory):
    """A run started from the baseline's step 4, killed before step 5 (its first commit would be
    step 6), so its retry must load the other run's step 4 again, not start from step 0."""
    return run_pretraining(_cfg(tmp_path_factory.mktemp("runs"), data_dir, "from_elsewhere",
                                "train.chaos.kill_worker_at_step=5", "train.chaos.kill_rank=1"),
                           resume=str(baseline_dir / "checkpoints" / "step_0000004"))


def test_a_resume_from_another_run_survives_a_kill_before_its_first_commit(baseline, baseline_dir,
                                                                            resumed_elsewhere):
    result = resumed_elsewhere
    assert [r["step"] for r in _restarts(result)] == [4, 4]
    assert all(r["checkpoint"].startswith(str(baseline_dir)) for r in _restarts(result))
    _assert_bitwise_equal(_final_state(result.run_dir), baseline)
    # Ray Train registered the checkpoints as they were committed: its Result names the last one.
    assert result.checkpoint == str(result.run_dir / "checkpoints" / f"step_{MAX_STEPS:07d}")


def test_a_roll_back_survives_a_kill_before_its_first_commit(baseline, resumed_elsewhere, data_dir):
    # That run committed 6 and 8. Roll it back to 6 and kill it before step 7: Ray Train restores
    # the first submission's step 8 as its latest, and the retry must still roll back to 6.
    run_dir = resumed_elsewhere.run_dir
    result = run_pretraining(_cfg(run_dir.parent, data_dir, run_dir.name, "train.chaos.kill_worker_at_step=7",
                                  "train.chaos.kill_rank=0"), resume="6")
    assert [r["step"] for r in _restarts(result) if r["time"] > resumed_elsewhere.events[-1]["time"]] == [6, 6]
    _assert_bitwise_equal(_final_state(result.run_dir), baseline)


def test_an_error_that_repeats_is_not_retried_max_failures_times(cluster, data_dir, tmp_path):
    from moray.platform.controller import RunFailed

    cfg = _cfg(tmp_path, data_dir, "bug", "train.max_failures=3", "train.chaos.raise_at_step=3",
               "train.chaos.once=false")
    with pytest.raises(RunFailed) as err:
        run_pretraining(cfg)
    assert "stopped without retrying" in str(err.value) and "raise_at_step" in str(err.value)
    events = [e["event"] for e in RunDir(str(tmp_path), "bug").read_events()]
    assert events.count("restart") == 1 and "fatal" in events  # one retry to tell a bug from bad luck


def test_a_missing_resume_target_fails_before_any_worker_starts(cluster, data_dir, tmp_path):
    from moray.platform.config import ConfigError

    with pytest.raises(ConfigError) as err:
        run_pretraining(_cfg(tmp_path, data_dir, "nothing_there"), resume="6")
    assert "--resume 6" in str(err.value) and "committed steps" in str(err.value)
    assert not any(e["event"] == "submit" for e in RunDir(str(tmp_path), "nothing_there").read_events())


def test_a_second_run_on_the_same_storage_is_refused_naming_the_holder(cluster, data_dir, tmp_path):
    from moray.platform.checkpoint import StorageLease
    from moray.platform.config import ConfigError

    storage = tmp_path / "shared_ckpt"
    holder = StorageLease(str(storage), "other-run-1234", run_name="other").acquire()
    try:
        with pytest.raises(ConfigError) as err:
            run_pretraining(_cfg(tmp_path, data_dir, "intruder", f"train.storage={storage}"))
        assert "other" in str(err.value) and "lease" in str(err.value)
        assert holder.held
    finally:
        holder.release()
