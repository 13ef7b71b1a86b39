"""The storage lease: one run writes to a checkpoint root; the others are refused, by name."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow._fs as pa_private_fs
import pyarrow.fs as pafs
import pytest
import torch

from moray.platform.checkpoint import (
    CheckpointError,
    CheckpointStore,
    LeaseHeldError,
    StorageLease,
    read_lease,
)
from moray.platform.checkpoint import lease as lease_mod

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

KINDS = ["local", "subtree_fs", "object_store"]


def target(tmp_path, kind):
    """(root, filesystem): a local path; pyarrow's path code over a local disk; an S3-like store."""
    if kind == "local":
        return str(tmp_path / "ckpt"), None
    if kind == "subtree_fs":
        return "ckpt", pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    return "bucket/ckpt", pa_private_fs._MockFileSystem()


def state(seed: int) -> dict:
    return {"w": torch.full((4, 4), float(seed))}


def wait_until(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("kind", KINDS)
def test_second_lease_is_refused_naming_the_holder_until_released(tmp_path, kind):
    root, fs = target(tmp_path, kind)
    a = StorageLease(root, "run-a", "alpha", filesystem=fs).acquire()
    b = StorageLease(root, "run-b", "beta", filesystem=fs, break_hint="--set train.break_lease=true")
    with pytest.raises(LeaseHeldError) as refused:
        b.acquire()
    msg = str(refused.value)
    for part in ("'alpha'", "run-a", f"pid {os.getpid()}", socket.gethostname(), "since", "train.storage",
                 "expires in", "--set train.break_lease=true"):
        assert part in msg, part
    assert isinstance(refused.value, CheckpointError) and not b.held

    assert a.release() and not a.held
    b.acquire()
    holder = read_lease(root, fs)
    assert (holder.run_id, holder.run_name, holder.pid) == ("run-b", "beta", os.getpid())
    assert not a.release()  # no longer ours: leaves b's alone
    assert read_lease(root, fs).run_id == "run-b"
    assert b.release() and read_lease(root, fs) is None


@pytest.mark.parametrize("kind", KINDS)
def test_a_lease_that_stops_being_renewed_expires(tmp_path, kind):
    root, fs = target(tmp_path, kind)
    a = StorageLease(root, "run-a", filesystem=fs, ttl_s=0.3).acquire()  # no heartbeat: "hung"
    b = StorageLease(root, "run-b", filesystem=fs)
    with pytest.raises(LeaseHeldError):
        b.acquire()
    time.sleep(0.35)
    b.acquire()
    assert read_lease(root, fs).run_id == "run-b"
    with pytest.raises(LeaseHeldError, match="lost the lease.*run-b"):
        a.renew()
    assert not a.held and not a.release() and read_lease(root, fs).run_id == "run-b"


@pytest.mark.parametrize("kind", ["local", "object_store"])
def test_heartbeat_keeps_the_lease_past_its_ttl(tmp_path, kind):
    root, fs = target(tmp_path, kind)
    with StorageLease(root, "run-a", filesystem=fs, ttl_s=0.3) as a:  # renews every 0.075 s
        first = read_lease(root, fs).renewed
        wait_until(lambda: read_lease(root, fs).renewed > first)
        time.sleep(0.4)
        with pytest.raises(LeaseHeldError):
            StorageLease(root, "run-b", filesystem=fs).acquire()
        assert a.lost is None
    assert read_lease(root, fs) is None


def test_heartbeat_records_a_lost_lease(tmp_path):
    root = str(tmp_path)
    a = StorageLease(root, "run-a", ttl_s=60).acquire()
    a.start_heartbeat(0.02)
    StorageLease(root, "run-b").acquire(force=True)  # an operator broke it
    wait_until(lambda: a.lost is not None)
    assert "run-b" in str(a.lost) and not a.held
    a.release()
    assert read_lease(root).run_id == "run-b"


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)  # exited and reaped: no process has this pid now


@pytest.mark.parametrize("kind", ["local", "object_store"])
def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, kind):
    root, fs = target(tmp_path, kind)
    dead = StorageLease(root, "run-dead", "crashed", filesystem=fs, ttl_s=3600).acquire()
    loc = dead.root.child(lease_mod.LEASE)
    record = json.loads(lease_mod._read_raw(loc))
    lease_mod.cfs.put_bytes(loc, json.dumps({**record, "pid": _dead_pid()}).encode())
    StorageLease(root, "run-b", filesystem=fs).acquire()
    assert read_lease(root, fs).run_id == "run-b"

    # The same record from another host is not known to be dead: it stands until it expires.
    elsewhere = {**json.loads(lease_mod._read_raw(loc)), "host": "elsewhere", "pid": 1, "run_id": "run-x"}
    lease_mod.cfs.put_bytes(loc, json.dumps(elsewhere).encode())
    with pytest.raises(LeaseHeldError, match="on elsewhere"):
        StorageLease(root, "run-c", filesystem=fs).acquire()


def test_force_breaks_a_lease_and_an_unreadable_one_says_what_to_do(tmp_path):
    root = str(tmp_path)
    a = StorageLease(root, "run-a").acquire()
    StorageLease(root, "run-b").acquire(force=True)
    with pytest.raises(LeaseHeldError, match="lost the lease"):
        a.renew()
    (tmp_path / "lease.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="lease.json is unreadable.*delete it.*force=True"):
        StorageLease(root, "run-c").acquire()
    StorageLease(root, "run-c").acquire(force=True)
    assert read_lease(root).run_id == "run-c"


def test_concurrent_takeovers_of_a_stale_lease_have_one_winner(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    root = str(tmp_path)
    StorageLease(root, "run-old", ttl_s=0.01).acquire()
    time.sleep(0.02)
    takers = [StorageLease(root, f"run-{i}") for i in range(8)]

    def take(lease):
        try:
            lease.acquire()
            return lease.run_id
        except LeaseHeldError:
            return None

    with ThreadPoolExecutor(8) as pool:
        winners = [w for w in pool.map(take, takers) if w]
    assert winners == [read_lease(root).run_id]
    assert sorted(os.listdir(tmp_path)) == ["lease.json"]  # no temporaries left behind


def test_run_ids_must_fit_in_file_names(tmp_path):
    with pytest.raises(ValueError, match="run_id"):
        StorageLease(str(tmp_path), "a/b")
    with pytest.raises(ValueError, match="run_id"):
        CheckpointStore(str(tmp_path), run_id="")


# --- the store under a lease ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "object_store"])
def test_a_store_never_deletes_another_runs_save_in_flight(tmp_path, kind):
    root, fs = target(tmp_path, kind)
    b = CheckpointStore(root, run_id="run-b", filesystem=fs)
    b.save(1, state(1))  # written, not yet committed: its temporary is there until b.poll()
    a = CheckpointStore(root, run_id="run-a", filesystem=fs)
    a.save(2, state(2))
    assert a.wait().cleaned == []
    anonymous = CheckpointStore(root, filesystem=fs)  # no run_id: still not b's to delete
    anonymous.save(3, state(3))
    assert anonymous.wait().cleaned == []
    assert b.wait().step == 1  # b's save was left whole and commits
    template = {"w": torch.zeros(4, 4)}
    assert a.load(template, 1).step == 1 and torch.equal(template["w"], state(1)["w"])


def test_a_store_clears_only_its_own_runs_crashed_temporaries(tmp_path):
    for name in ("step_0000001.tmp-run-a-1a2b3c4d", "step_0000002.tmp-run-b-1a2b3c4d",
                 "step_0000003.tmp-0badf00d", "step_0000004.old-run-a-deadbeef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__0_0.distcp").write_bytes(b"partial")
    info = CheckpointStore(str(tmp_path), run_id="run-a", async_save=False).save(5, state(5)).commit
    assert sorted(os.path.basename(p) for p in info.cleaned) == [
        "step_0000001.tmp-run-a-1a2b3c4d", "step_0000004.old-run-a-deadbeef"]
    info = CheckpointStore(str(tmp_path), async_save=False).save(6, state(6)).commit
    assert [os.path.basename(p) for p in info.cleaned] == ["step_0000003.tmp-0badf00d"]
    assert (tmp_path / "step_0000002.tmp-run-b-1a2b3c4d" / "__0_0.distcp").exists()


def test_an_in_place_save_of_the_same_step_by_another_run_is_refused(tmp_path):
    root, fs = target(tmp_path, "object_store")
    CheckpointStore(root, run_id="run-b", filesystem=fs).save(1, state(1))  # never committed
    with pytest.raises(CheckpointError, match="unfinished save of step 1 by run 'run-b'"):
        CheckpointStore(root, run_id="run-a", filesystem=fs).save(1, state(1))


@pytest.mark.parametrize("kind", ["local", "object_store"])
def test_a_commit_under_another_runs_lease_fails_and_latest_stays(tmp_path, kind):
    root, fs = target(tmp_path, kind)
    mine = StorageLease(root, "run-a", "alpha", filesystem=fs).acquire()
    store = CheckpointStore(root, run_id="run-a", filesystem=fs)
    store.save(1, state(1))
    assert store.wait().step == 1  # under its own lease: commits
    store.save(2, state(2))
    StorageLease(root, "run-b", "beta", filesystem=fs).acquire(force=True)  # taken while saving
    with pytest.raises(LeaseHeldError, match="cannot commit step 2.*'beta'.*`latest` did not move"):
        store.wait()
    assert store.latest_step() == 1
    assert [e.step for e in store.list_checkpoints() if e.committed] == [1]
    with pytest.raises(LeaseHeldError, match="cannot save step 3"):  # refused before writing anything
        store.save(3, state(3))
    with pytest.raises(LeaseHeldError, match="a store without a run_id"):
        CheckpointStore(root, filesystem=fs).save(3, state(3))
    assert not mine.release()
    template = {"w": torch.zeros(4, 4)}
    assert store.load(template).step == 1 and torch.equal(template["w"], state(1)["w"])


def test_an_expired_lease_does_not_block_commits(tmp_path):
    StorageLease(str(tmp_path), "run-b", ttl_s=0.01).acquire()
    time.sleep(0.02)
    store = CheckpointStore(str(tmp_path), run_id="run-a", async_save=False)
    assert store.save(1, state(1)).commit.step == 1
