"""The checkpoint store: round trips, torn saves, corruption, keep-k, URIs, resharding."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow._fs as pa_private_fs
import pyarrow.fs as pafs
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moray.platform.checkpoint import (
    PHASES,
    CheckpointError,
    CheckpointStore,
    NoCheckpointError,
    rng_state_json,
    set_rng_state_json,
    verify_checkpoint,
)

# DCP warns on every single-process save/load that torch.distributed is not initialised.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def reference_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.w": torch.randn(8, 6, generator=g),
        "model.layers.0.b": torch.randn(6, generator=g),
        "optim.layers.0.w.exp_avg": torch.randn(8, 6, generator=g),
        "optim.layers.0.w.step": torch.tensor(7.0),
    }


def zeros_like(state: dict) -> dict:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def assert_state_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def save_steps(store: CheckpointStore, steps, seed_of=lambda s: s) -> None:
    for step in steps:
        store.save(step, reference_state(seed_of(step)), extra={"step": step})
        store.wait()


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_restores_tensors_and_extra_state(tmp_path, async_save):
    store = CheckpointStore(str(tmp_path / "ckpt"), async_save=async_save, layout={"dp": 1})
    rng = rng_state_json()
    handle = store.save(100, reference_state(), extra={"step": 100, "sampler": {"pos": [3, 4]}},
                        rank_extra={"rng": rng})
    info = store.wait() if async_save else handle.commit
    assert info is not None and info.step == 100 and info.bytes > 0
    assert (tmp_path / "ckpt" / "step_0000100").is_dir()
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0000100"
    manifest = json.loads((tmp_path / "ckpt" / "step_0000100" / "manifest.json").read_text())
    assert manifest["step"] == 100 and manifest["layout"] == {"dp": 1}
    assert {".metadata", "extra.json", "rank_extra.00000.json"} <= manifest["files"].keys()
    assert verify_checkpoint(info.path) == []

    template = zeros_like(reference_state())
    res = CheckpointStore(str(tmp_path / "ckpt")).load(template)
    assert_state_equal(template, reference_state())
    assert (res.step, res.extra, res.skipped) == (100, {"step": 100, "sampler": {"pos": [3, 4]}}, [])
    assert res.rank_extra == {"rng": rng} and res.warnings == []


def test_async_save_snapshots_state_at_save_time(tmp_path):
    store = CheckpointStore(str(tmp_path))
    state = reference_state()
    store.save(1, state)
    for t in state.values():  # the training loop goes on and updates parameters in place
        t.add_(1.0)
    store.wait()
    template = zeros_like(state)
    store.load(template)
    assert_state_equal(template, reference_state())


def test_poll_commits_once_the_write_is_done_and_save_flushes_the_previous(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.save(1, reference_state(1))
    assert store.pending_step == 1
    while (info := store.poll()) is None:
        time.sleep(0.01)
    assert info.step == 1 and store.pending_step is None and store.poll() is None
    store.save(2, reference_state(2))
    handle = store.save(3, reference_state(3))  # must commit step 2 first
    assert handle.previous is not None and handle.previous.step == 2
    assert store.wait().step == 3 and store.latest_step() == 3
    assert store.load(zeros_like(reference_state()), "2").step == 2  # --resume 2


def test_crash_hook_belongs_to_the_save_it_was_set_for(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.save(1, reference_state(1))
    fired = []
    store.crash_hook = fired.append
    store.save(2, reference_state(2))  # commits step 1 first, with step 1's (absent) hook
    assert fired == []
    store.wait()
    assert fired == list(PHASES)


@pytest.mark.parametrize("kind", ["file_uri", "subtree_fs", "object_store"])
def test_pyarrow_targets(tmp_path, kind):
    if kind == "file_uri":
        store = CheckpointStore(f"file://{tmp_path}/ckpt", keep=2)
    elif kind == "subtree_fs":
        store = CheckpointStore("ckpt", keep=2,
                                filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    else:  # pyarrow's in-memory file system, driven like S3: no directory rename
        store = CheckpointStore("bucket/run/ckpt", keep=2, filesystem=pa_private_fs._MockFileSystem())
        assert not store.root.can_rename
    save_steps(store, [1, 2, 3])
    assert [(e.step, e.committed) for e in store.list_checkpoints()] == [(2, True), (3, True)]
    fs = None if kind == "file_uri" else store.root.fs
    assert verify_checkpoint(store.list_checkpoints()[-1].path, filesystem=fs) == []
    template = zeros_like(reference_state())
    assert store.load(template).step == 3
    assert_state_equal(template, reference_state(3))
    assert store.load(template, "step_0000002").step == 2  # a name under the root
    assert_state_equal(template, reference_state(2))
    if kind == "file_uri":  # a checkpoint named by its full URI
        assert store.load(zeros_like(template), f"file://{tmp_path}/ckpt/step_0000003").step == 3


def test_keep_last_k_deletes_only_after_the_new_one_commits(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    save_steps(store, [10, 20])
    store.save(30, reference_state(30))
    assert [e.step for e in store.list_checkpoints() if e.committed] == [10, 20]  # not yet
    info = store.wait()
    assert [os.path.basename(p) for p in info.pruned] == ["step_0000010"]
    assert [e.step for e in store.list_checkpoints()] == [20, 30]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("root_kind", ["local", "object_store"])
def test_failed_commit_leaves_previous_checkpoint_latest(tmp_path, phase, root_kind):
    fs = pa_private_fs._MockFileSystem() if root_kind == "object_store" else None
    root = "ckpt" if fs else str(tmp_path)

    def crash(p):
        if p == phase:
            raise RuntimeError(f"injected crash at {p}")

    save_steps(CheckpointStore(root, filesystem=fs), [1])
    store = CheckpointStore(root, crash_hook=crash, filesystem=fs)
    store.save(2, reference_state(2))
    with pytest.raises(CheckpointError, match=f"injected crash at {phase}"):
        store.wait()

    fresh = CheckpointStore(root, filesystem=fs)
    assert fresh.latest_step() == 1
    if root_kind == "local" and phase != "before_latest":  # the torn save is visible, uncommitted
        assert (2, False) in [(e.step, e.committed) for e in fresh.list_checkpoints()]
    template = zeros_like(reference_state())
    assert fresh.load(template).step == 1
    assert_state_equal(template, reference_state(1))
    # The next save clears the leftovers and commits.
    fresh.save(2, reference_state(2))
    info = fresh.wait()
    assert fresh.latest_step() == 2
    assert all(".tmp-" not in e.path for e in fresh.list_checkpoints())
    assert bool(info.cleaned) == (phase != "before_latest" or root_kind == "object_store")


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from moray.platform.checkpoint import CheckpointStore
    root, phase = sys.argv[1], sys.argv[2]
    state = {"model.w": torch.full((64, 64), 2.0)}
    store = CheckpointStore(root, crash_hook=lambda p: p == phase and os._exit(17))
    store.save(2, state)
    store.wait()
    os._exit(0)
""")


def test_process_killed_at_each_phase_leaves_previous_checkpoint_latest(tmp_path):
    roots = {phase: tmp_path / phase for phase in PHASES}
    for root in roots.values():
        store = CheckpointStore(str(root))
        store.save(1, {"model.w": torch.ones(64, 64)})
        store.wait()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = {phase: subprocess.Popen([sys.executable, "-c", _CRASH_SCRIPT, str(root), phase], env=env)
             for phase, root in roots.items()}
    for phase, proc in procs.items():
        assert proc.wait(timeout=120) == 17, phase
        store = CheckpointStore(str(roots[phase]))
        assert store.latest_step() == 1, phase
        template = {"model.w": torch.zeros(64, 64)}
        assert store.load(template).step == 1
        assert torch.equal(template["model.w"], torch.ones(64, 64))


def test_corrupt_shard_is_skipped_in_favour_of_the_previous_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path))
    save_steps(store, [1, 2])
    shard = next((tmp_path / "step_0000002").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("sha256 mismatch" in p for p in verify_checkpoint(str(tmp_path / "step_0000002")))

    template = zeros_like(reference_state())
    res = store.load(template)
    assert res.step == 1
    assert_state_equal(template, reference_state(1))
    [(path, reason)] = res.skipped
    assert path.endswith("step_0000002") and "sha256 mismatch" in reason
    with pytest.raises(CheckpointError, match="not loadable"):
        store.load(template, 2)  # named explicitly: no silent fallback


def test_checkpoint_without_manifest_is_not_loadable(tmp_path):
    store = CheckpointStore(str(tmp_path))
    save_steps(store, [1, 2])
    (tmp_path / "step_0000002" / "manifest.json").unlink()
    assert [(e.step, e.committed) for e in store.list_checkpoints()] == [(1, True), (2, False)]
    assert verify_checkpoint(str(tmp_path / "step_0000002")) == ["no manifest.json: the save never committed"]
    res = store.load(zeros_like(reference_state()))
    assert res.step == 1 and "no manifest.json" in res.skipped[0][1]


def test_errors_say_what_is_wrong(tmp_path):
    store = CheckpointStore(str(tmp_path))
    assert store.latest_step() is None
    with pytest.raises(NoCheckpointError, match="latest"):
        store.load(zeros_like(reference_state()))
    save_steps(store, [1])
    next((tmp_path / "step_0000001").glob("*.distcp")).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no loadable checkpoint.*step_0000001"):
        store.load(zeros_like(reference_state()))
    with pytest.raises(CheckpointError, match="JSON"):
        store.save(2, reference_state(), extra={"bad": object()})
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(str(tmp_path), keep=0)


# --- loading runs no code from the checkpoint ------------------------------------------


class _Trap:
    """Unpickling it creates `path`: proof that loading ran code from the checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _replace_file(ckpt, name: str, data: bytes, drop: str = None) -> None:
    """Put `data` at ckpt/name and re-sign the manifest, as a crafted checkpoint would."""
    import hashlib

    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rank": 0}
    manifest["files"].pop(drop, None)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_rank_extra_must_be_json_and_the_error_says_where(tmp_path):
    store = CheckpointStore(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"rank_extra\['rng'\]\['torch'\] is a torch.Tensor.*tolist"):
        store.save(1, reference_state(), rank_extra={"rng": {"torch": torch.get_rng_state()}})
    with pytest.raises(CheckpointError, match=r"rank_extra\['keys'\]\[1\] is a numpy.ndarray"):
        store.save(1, reference_state(), rank_extra={"keys": [0, np.zeros(3)]})
    with pytest.raises(CheckpointError, match=r"rank_extra key 3 is a int \(JSON keys are strings\)"):
        store.save(1, reference_state(), rank_extra={3: "x"})
    assert store.latest_step() is None and store.list_checkpoints() == []


def test_legacy_pickled_rank_extra_is_never_unpickled(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.save(1, reference_state(1), extra={"step": 1}, rank_extra={"n": 1})
    store.wait()
    trap = tmp_path / "ran_code_from_the_checkpoint"
    import pickle

    _replace_file(tmp_path / "step_0000001", "rank_extra.00000.pkl", pickle.dumps({"rng": _Trap(trap)}),
                  drop="rank_extra.00000.json")
    assert verify_checkpoint(str(tmp_path / "step_0000001")) == []  # a well-formed old checkpoint
    template = zeros_like(reference_state())
    res = store.load(template)
    assert not trap.exists()
    assert res.step == 1 and res.extra == {"step": 1} and res.rank_extra is None
    assert_state_equal(template, reference_state(1))
    [warning] = res.warnings
    assert "rank_extra.00000.pkl" in warning and "older moray" in warning and "ignored" in warning


def test_dcp_metadata_with_code_in_it_is_refused(tmp_path):
    import pickle

    store = CheckpointStore(str(tmp_path))
    save_steps(store, [1])
    trap = tmp_path / "ran_code_from_the_checkpoint"
    _replace_file(tmp_path / "step_0000001", ".metadata", pickle.dumps(_Trap(trap)))
    with pytest.raises(CheckpointError, match="not part of DCP's metadata"):
        store.load(zeros_like(reference_state()), 1)
    assert not trap.exists()


def test_pickled_values_in_shards_are_read_weights_only(tmp_path):
    trap = tmp_path / "ran_code_from_the_checkpoint"
    store = CheckpointStore(str(tmp_path / "plain"), async_save=False)
    store.save(1, {"w": torch.ones(3), "n": 5, "names": ["a", "b"]})  # DCP pickles non-tensors
    template = {"w": torch.zeros(3), "n": 0, "names": []}
    store.load(template)
    assert torch.equal(template["w"], torch.ones(3)) and template["n"] == 5 and template["names"] == ["a", "b"]

    store = CheckpointStore(str(tmp_path / "trap"), async_save=False)
    store.save(1, {"w": torch.ones(3), "obj": _Trap(trap)})
    with pytest.raises(CheckpointError, match="Weights only load failed"):
        store.load({"w": torch.zeros(3), "obj": None})
    assert not trap.exists()


def test_rng_state_round_trips_through_json_exactly():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal(), random.gauss(0, 1)  # leave a cached gaussian in each

    def draws():
        return (torch.rand(4).tolist(), torch.randn(2).tolist(), np.random.rand(3).tolist(),
                np.random.standard_normal(3).tolist(), random.random(), random.gauss(0, 1))

    saved = json.loads(json.dumps(rng_state_json()))
    want = draws()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state_json(saved)
    assert draws() == want


def _two_rank_worker(rank: int, root: str, init_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        full = reference_state()
        state = {
            "model.layers.0.w": distribute_tensor(full["model.layers.0.w"], mesh, [Shard(0)]),
            "model.layers.0.b": full["model.layers.0.b"],  # a plain tensor, the same on each rank
            "optim.layers.0.w.exp_avg": distribute_tensor(full["optim.layers.0.w.exp_avg"], mesh, [Shard(1)]),
            "optim.layers.0.w.step": full["optim.layers.0.w.step"],
        }
        store = CheckpointStore(root, rank=rank, world_size=2)
        store.save(5, state, extra={"step": 5}, rank_extra={"rank": rank})
        while store.poll() is None:  # every rank polls at the same "step boundaries"
            time.sleep(0.01)
        # Reload into another layout: everything replicated.
        template = {k: distribute_tensor(torch.zeros_like(v), mesh, [Replicate()]) for k, v in full.items()}
        res = store.load(template)
        assert res.step == 5 and res.rank_extra == {"rank": rank}
        for k, v in full.items():
            assert torch.equal(template[k].full_tensor(), v), k
    finally:
        dist.destroy_process_group()


def test_two_ranks_save_sharded_and_reload_under_another_layout(tmp_path):
    root = str(tmp_path / "ckpt")
    mp.spawn(_two_rank_worker, args=(root, str(tmp_path / "pg_init")), nprocs=2, join=True)
    manifest = json.loads((tmp_path / "ckpt" / "step_0000005" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {f["rank"] for f in manifest["files"].values()} == {0, 1}
    template = zeros_like(reference_state())  # world 1, full tensors
    res = CheckpointStore(root).load(template)
    assert_state_equal(template, reference_state())
    assert res.rank_extra == {"rank": 0}
