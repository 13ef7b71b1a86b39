"""The driver-side half of training supervision, without a cluster: config values that
could only fail inside a worker are refused by key, the watchdog bounds start-up and
checkpoint waits apart from steps, the resume decision survives retries, and the
failure callback stops a run that retrying cannot fix."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from moray.actors import resume
from moray.actors.errors import NonRetryableError
from moray.actors.watchdog import StepWatchdog
from moray.platform.checkpoint import CheckpointStore
from moray.platform.config import ConfigError, load_config
from moray.platform.failures import FailureEvents, RunStopped, classify
from moray.platform.runlog import RunDir


@pytest.mark.parametrize("override,key,allowed", [
    ("train.checkpoint_every=0", "train.checkpoint_every", "greater than or equal to 1"),
    ("train.log_every=0", "train.log_every", "greater than or equal to 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints", "greater than or equal to 1"),
    ("train.hang_timeout_s=0", "train.hang_timeout_s", "greater than 0"),
    ("train.checkpoint_timeout_s=-1", "train.checkpoint_timeout_s", "greater than 0"),
    ("train.betas=[0.9]", "train.betas", "two values, each in [0, 1)"),
    ("train.betas=[0.9, 1.5]", "train.betas", "two values, each in [0, 1)"),
    ("train.max_steps=0", "train.max_steps", "greater than or equal to 1"),
    ("train.lr=0", "train.lr", "greater than 0"),
    ("train.runs_dir=s3://bucket/runs", "train.runs_dir", "train.storage"),
])
def test_values_that_only_fail_in_a_worker_fail_in_the_driver(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    assert f"{key}:" in str(err.value) and allowed in str(err.value)


def test_a_file_uri_runs_dir_is_a_plain_path():
    assert load_config("configs/tiny.yaml", ["train.runs_dir=file:///tmp/runs"]).train.runs_dir == "/tmp/runs"


# ---------------------------------------------------------------- watchdog

def _dog(step_timeout: float):
    hangs = []
    fired = threading.Event()

    def on_hang(stalled, step, phase):
        hangs.append((phase, step))

    dog = StepWatchdog(step_timeout, on_hang, exit=lambda code: fired.set())
    return dog, hangs, fired


def test_watchdog_bounds_checkpoint_waits_and_startup_by_their_own_limits():
    dog, hangs, fired = _dog(0.2)
    dog.start("startup", timeout_s=5.0)
    time.sleep(0.6)  # a slow first step: three step limits, well inside the start-up limit
    dog.beat(0)
    with dog.phase("checkpoint", 5.0):
        time.sleep(0.6)  # a slow save
    assert dog.current == ("step", 0.2)
    dog.beat(1)
    dog.stop()
    assert not fired.is_set() and hangs == []


def test_watchdog_ends_a_stalled_step_and_names_the_phase():
    dog, hangs, fired = _dog(0.2)
    dog.start()
    dog.beat(3)
    assert fired.wait(5.0)
    dog.stop()
    assert hangs == [("step", 3)]

    dog, hangs, fired = _dog(0.2)
    dog.start()
    with dog.phase("checkpoint", 0.3):
        assert fired.wait(5.0)
    dog.stop()
    assert hangs == [("checkpoint", None)]


# ---------------------------------------------------------------- the resume decision

@pytest.fixture()
def store(tmp_path):
    s = CheckpointStore(str(tmp_path / "ckpt"), keep=10, async_save=False)
    state = {"w": torch.arange(4.0)}
    for step, submit in ((2, "first"), (4, "first"), (6, "second")):
        s.save(step, state, extra={"step": step, "submit_id": submit})
    yield s
    s.close()


def test_a_retry_goes_on_from_its_own_submissions_newest_checkpoint(store):
    # Also when Ray Train never took in the newest report (a worker died right after the commit).
    for reported in (str(store.root.child("step_0000006")), str(store.root.child("step_0000004")), None):
        d = resume.decide("2", "second", reported=reported, store=store)
        assert d.target == "latest" and "step 6" in d.why


def test_a_retry_before_the_first_new_commit_does_what_was_asked(store):
    # Ray Train hands back the previous submission's checkpoint (restored from its snapshot):
    # not this submission's, so `--resume 2` still means step 2 and a resume from elsewhere stays there.
    theirs = str(store.root.child("step_0000006"))
    assert resume.decide("2", "third", reported=theirs, store=store).target == 2
    assert resume.decide("/elsewhere/step_0000008", "third", reported=None, store=store).target == \
        "/elsewhere/step_0000008"
    assert resume.decide("never", "third", reported=theirs, store=store).fresh
    assert resume.decide("auto", "third", reported=theirs, store=store).target == "latest"


def test_a_pointer_checkpoint_names_the_stored_one(store, tmp_path):
    pointer = tmp_path / "refs" / "step_0000004"
    pointer.mkdir(parents=True)
    (pointer / resume.POINTER).write_text(json.dumps({"path": str(store.root.child("step_0000004"))}))
    assert resume.decide("never", "first", reported=str(pointer), store=store).target == \
        str(store.root.child("step_0000004"))


def test_auto_with_nothing_committed_starts_fresh(tmp_path):
    s = CheckpointStore(str(tmp_path / "empty"), async_save=False)
    assert resume.decide("auto", "x", reported=None, store=s).fresh


def test_an_error_while_deciding_stops_without_retry_unless_storage_did_not_answer():
    with pytest.raises(NonRetryableError):
        resume.agree(lambda: (_ for _ in ()).throw(ValueError("bad")), rank=0)
    with pytest.raises(RuntimeError) as err:
        resume.agree(lambda: (_ for _ in ()).throw(OSError("timed out")), rank=0)
    assert not isinstance(err.value, NonRetryableError)


# ---------------------------------------------------------------- the failure callback

def _traceback(kind: str, msg: str) -> Exception:
    return RuntimeError(f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{kind}: {msg}\n")


def test_a_non_retryable_error_stops_the_run_at_once(tmp_path):
    cb = FailureEvents(str(tmp_path), submit_id="s1")
    with pytest.raises(RunStopped):
        cb.after_exception(None, {0: _traceback("moray.actors.errors.NonRetryableError", "bad layout")})
    events = RunDir.at(str(tmp_path)).read_events()
    assert [e["event"] for e in events] == ["failure", "fatal"]
    assert events[-1]["submit_id"] == "s1" and "bad layout" in events[-1]["error"]


def test_the_same_error_twice_without_progress_stops_the_run(tmp_path):
    cb = FailureEvents(str(tmp_path))
    bug = {1: _traceback("TypeError", "unsupported operand")}
    cb.after_exception(None, bug)  # the first time: Ray Train retries
    cb.after_report(None, {}, checkpoint=object())  # progress: the next one is a new failure
    cb.after_exception(None, bug)
    with pytest.raises(RunStopped) as err:
        cb.after_exception(None, bug)
    assert "TypeError: unsupported operand" in str(err.value)


def test_lost_workers_are_retried_however_often(tmp_path):
    cb = FailureEvents(str(tmp_path))
    died = {0: RuntimeError("ActorDiedError: The actor died unexpectedly before finishing this task.")}
    for _ in range(4):
        cb.after_exception(None, died)
    assert classify(died[0]) == "worker_died"
