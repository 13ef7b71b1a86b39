"""Pretraining on a real local Ray cluster: Ray Train workers hosting pipeline stages
and expert shards, checkpoints that move between layouts, memory against the plan."""

from __future__ import annotations

import pytest

from moray.platform.config import ConfigError, load_config
from moray.platform.controller import Controller, run_pretraining

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# One LR schedule for every run (it depends on lr_decay_steps, not on where a run stops).
STEPS = ["train.checkpoint_every=2", "train.keep_checkpoints=5", "train.warmup_steps=2", "train.lr_decay_steps=8",
         "train.max_failures=0"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(tmp_path, data_dir, name, layout, extra=()):
    return load_config("configs/tiny.yaml", [f"train.runs_dir={tmp_path}", f"train.run_name={name}",
                                             f"data.dir={data_dir}", *STEPS, *layout, *extra])


PP2_EP2 = ["parallel.pp=2", "parallel.ep=2", "cluster.num_workers=4"]
PP1_DP2 = ["parallel.pp=1", "parallel.ep=1", "cluster.num_workers=2"]


@pytest.mark.parametrize("layout,why", [
    (["parallel.pp=3", "cluster.num_workers=4"], "not divisible"),
    (["parallel.ep=3", "parallel.pp=1", "cluster.num_workers=3"], "expert"),
    (["parallel.pp=8", "cluster.num_workers=8"], "layers"),
])
def test_bad_layout_fails_before_any_worker_starts(tmp_path, layout, why):
    cfg = load_config("configs/tiny.yaml", [f"train.runs_dir={tmp_path}", *layout])
    with pytest.raises(ConfigError) as err:
        Controller(cfg)
    assert why in str(err.value)
    assert not (tmp_path / cfg.train.run_name / "events.jsonl").exists()


def test_pipeline_and_expert_parallel_run_and_resume_across_layouts(ray_cluster, data_dir, tmp_path):
    # A: 8 uninterrupted steps at pp 2 x ep 2 (4 workers).
    a = run_pretraining(_cfg(tmp_path, data_dir, "a", PP2_EP2, ["train.max_steps=8"]))
    loss_a = {m["step"]: m["loss"] for m in a.metrics}
    assert sorted(loss_a) == list(range(8))
    assert loss_a[7] < loss_a[0]
    kinds = [e["event"] for e in a.events]
    assert kinds[:2] == ["submit", "start"] and kinds[-1] == "finish"
    assert [e["step"] for e in a.events if e["event"] == "checkpoint"] == [2, 4, 6, 8]
    assert a.loss_png is not None and a.loss_png.stat().st_size > 10_000

    # Each of the 4 workers measured its peak tensor memory; the planner agrees within 25%.
    memory = [e for e in a.events if e["event"] == "memory"]
    assert sorted(e["rank"] for e in memory) == [0, 1, 2, 3]
    for e in memory:
        assert 0.75 <= e["measured_over_planned"] <= 1.25, e

    # B: resume A's step-4 checkpoint at pp 1 (2 workers, dp 2): the loss goes on where it left off.
    b = run_pretraining(_cfg(tmp_path, data_dir, "b", PP1_DP2, ["train.max_steps=6"]),
                        resume=str(tmp_path / "a" / "checkpoints" / "step_0000004"))
    loss_b = {m["step"]: m["loss"] for m in b.metrics}
    assert sorted(loss_b) == [4, 5]
    for s in (4, 5):
        assert loss_b[s] == pytest.approx(loss_a[s], rel=1e-4)
    assert [e for e in b.events if e["event"] == "restart"][0]["step"] == 4

    # C: and back, B's step 6 (saved at pp 1) resumed at pp 2 x ep 2.
    c = run_pretraining(_cfg(tmp_path, data_dir, "c", PP2_EP2, ["train.max_steps=8"]),
                        resume=str(tmp_path / "b" / "checkpoints" / "step_0000006"))
    loss_c = {m["step"]: m["loss"] for m in c.metrics}
    assert sorted(loss_c) == [6, 7]
    for s in (6, 7):
        assert loss_c[s] == pytest.approx(loss_a[s], rel=1e-4)
