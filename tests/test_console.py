import io

import pytest

from moray.platform.console import Console, StepLine, duration, event_line, run_summary


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def _rec(step, loss=4.1234, **kw):
    return {"step": step, "loss": loss, "aux_loss": 1.002, "lr": 3e-3, "tokens_per_s": 12345.4, "mfu": 0.012,
            **kw}


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.4, "59s"), (192, "3m12s"), (3600, "1h00m"),
                                          (2 * 3600 + 5 * 60 + 59, "2h05m"), (3 * 86400 + 4 * 3600, "3d04h")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_step_line_shows_steps_done_of_max():
    line = StepLine(300, clock=FakeClock()).format(_rec(11))
    assert line == "step  12/300 | loss 4.1234 | aux 1.002 | lr 3.00e-03 | 12,345 tok/s | mfu 1.2% | eta --"


def test_step_line_without_aux_and_with_a_skipped_step():
    line = StepLine(9, clock=FakeClock()).format(_rec(0, loss=float("nan"), aux_loss=None, skipped=True))
    assert line == "step 1/9 | loss nan | lr 3.00e-03 | 12,345 tok/s | mfu 1.2% | eta -- | skipped (non-finite)"


def test_eta_leaves_out_set_up_and_warm_up_then_converges():
    clock = FakeClock()
    line = StepLine(100, clock=clock, window=5, skip=1)
    line.format(_rec(0))  # after 10 minutes of set-up: never counted
    clock.t += 60
    assert line.format(_rec(1)).endswith("eta --")  # the warm-up interval is skipped
    etas = []
    for step in range(2, 12):
        clock.t += 4.0 if step < 6 else 2.0  # the steps speed up
        line.format(_rec(step))
        etas.append(line.eta(step + 1))
    assert etas[0] == pytest.approx(97 * 4.0)
    assert etas == sorted(etas, reverse=True)
    assert line.seconds_per_step() == pytest.approx(2.0)  # the window holds only 2 s steps now
    assert line.format(_rec(11)).endswith("eta 2m56s")  # 88 steps left x 2 s


def test_eta_counts_steps_between_lines_and_one_slow_step_moves_it_a_little():
    clock = FakeClock()
    line = StepLine(1000, clock=clock, window=10, skip=0)
    line.format(_rec(0))
    for step in range(10, 110, 10):  # a line every 10 steps of 1 s each
        clock.t += 10.0
        line.format(_rec(step))
    assert line.seconds_per_step() == pytest.approx(1.0)
    clock.t += 10.0 + 30.0  # a checkpoint stalled these 10 steps by 30 s
    line.format(_rec(110))
    assert line.seconds_per_step() == pytest.approx(1.3)


def test_console_writes_every_log_every_step_and_the_last():
    out = io.StringIO()
    console = Console(max_steps=7, log_every=3, stream=out, clock=FakeClock())
    for step in range(7):
        console.step(_rec(step))
    assert [line.split(" |")[0] for line in out.getvalue().splitlines()] == \
        ["step 1/7", "step 4/7", "step 7/7"]


def test_console_event_lines_go_to_the_stream():
    out = io.StringIO()
    console = Console(max_steps=7, stream=out)
    console.event({"event": "checkpoint", "step": 5, "path": "/r/step_0000005", "seconds": 1.234, "stall_s": 0.05})
    console.event({"event": "memory", "rank": 0, "total_peak": 1})
    assert out.getvalue() == \
        "checkpoint | step 5 saved to /r/step_0000005 (1.2s, training stalled 0.05s)\n"


LAYOUT = {"world_size": 4, "pp": 2, "dp": 2, "tp": 1, "ep": 2}


@pytest.mark.parametrize("kind,fields,line", [
    ("submit", {"world_size": 4, "resume": "auto", "layout": LAYOUT},
     "submit     | 4 workers (pp=2 dp=2 tp=1 ep=2), resume=auto; starting them"),
    ("start", {"step": 0, "world_size": 4, "layout": LAYOUT},
     "start      | fresh start on 4 workers (pp=2 dp=2 tp=1 ep=2)"),
    ("restart", {"step": 40, "checkpoint": "/c/step_0000040", "steps_lost": 3, "load_seconds": 1.25},
     "restart    | resumed at step 40 from /c/step_0000040 (loaded in 1.2s, 3 steps to redo)"),
    ("checkpoint", {"step": 50, "path": "/c/step_0000050", "seconds": 2.04, "stall_s": 0.051},
     "checkpoint | step 50 saved to /c/step_0000050 (2.0s, training stalled 0.05s)"),
    ("checkpoint_skipped", {"path": "/c/step_0000050", "reason": "incomplete"},
     "checkpoint | skipped /c/step_0000050: incomplete"),
    ("failure", {"rank": 1, "what": "worker_died", "error": "ActorDiedError: the actor died\nTraceback..."},
     "failure    | rank 1 worker_died: ActorDiedError: the actor died"),
    ("hang", {"rank": 0, "step": 12, "stalled_s": 301.2, "timeout_s": 300.0},
     "hang       | rank 0: no step finished for 5m01s after step 12 (train.hang_timeout_s=300.0); "
     "ending it so the group restarts"),
    ("hang", {"rank": 1, "step": None, "stalled_s": 61, "timeout_s": 60},
     "hang       | rank 1: no step finished for 1m01s before the first step (train.hang_timeout_s=60); "
     "ending it so the group restarts"),
    ("halt", {"step": 11, "loss": float("nan"), "reason": "non-finite loss (train.on_nan=halt)"},
     "halt       | step 12: loss nan; non-finite loss (train.on_nan=halt)"),
    ("nan", {"step": 11, "loss": float("inf"), "action": "restart"},
     "nan        | step 12: loss inf; restarting from the last checkpoint (train.on_nan=restart)"),
    ("step_skipped", {"step": 4, "loss": float("nan"), "reason": "non-finite loss or gradient"},
     "skipped    | step 5: non-finite loss or gradient (loss nan); weights unchanged"),
    ("chaos", {"what": "crash_during_checkpoint", "rank": 0, "step": 6, "phase": "shards_written"},
     "chaos      | injected crash_during_checkpoint on rank 0 at step 6, shards_written (train.chaos)"),
])
def test_event_line_for_each_kind(kind, fields, line):
    assert event_line(kind, fields) == line


@pytest.mark.parametrize("kind", ["finish", "gave_up", "memory", "something_new"])
def test_events_without_a_line(kind):
    assert event_line(kind, {"step": 1}) is None


def test_failure_line_keeps_a_long_error_short():
    line = event_line("failure", {"rank": 0, "what": "exception", "error": "x" * 500})
    assert line.endswith("x...") and len(line) < 250


def _run_files(tmp_path):
    run = tmp_path / "tiny"
    (run / "tensorboard").mkdir(parents=True)
    metrics = [{"step": s, "time": 200.0 + s, "loss": 5.0 - s / 2, "tokens_seen": 1024 * (s + 1)}
               for s in (0, 1, 2, 3)]
    metrics += [{"step": 3, "time": 230.0, "loss": 3.4, "tokens_seen": 4096},  # redone after the restart
                {"step": 4, "time": 231.0, "loss": 3.0, "tokens_seen": 5120}]
    events = [
        {"event": "submit", "time": 100.0},  # an earlier job: its counts are not this job's
        {"event": "start", "time": 110.0},
        {"event": "failure", "time": 120.0, "what": "node_lost", "rank": 0},
        {"event": "submit", "time": 190.0},
        {"event": "start", "time": 195.0},
        {"event": "checkpoint", "time": 203.0, "step": 3, "path": str(run / "checkpoints/step_0000003")},
        {"event": "hang", "time": 210.0, "rank": 1, "step": 4},
        {"event": "failure", "time": 211.0, "what": "worker_died", "rank": 1},
        {"event": "restart", "time": 229.0, "step": 3, "steps_lost": 1},
        {"event": "checkpoint", "time": 232.0, "step": 5, "path": str(run / "checkpoints/step_0000005")},
        {"event": "finish", "time": 322.0, "step": 5},
    ]
    return run, metrics, events


def test_run_summary(tmp_path):
    run, metrics, events = _run_files(tmp_path)
    text = run_summary(metrics, events, run, loss_png=run / "loss.png", max_steps=5)
    assert text.splitlines() == [
        "run 'tiny' finished at step 5/5 in 2m12s",
        "  loss        5.0000 -> 3.0000",
        "  tokens      5,120",
        "  restarts    1 after 1 failure(s): worker_died; 1 steps redone",
        "  hangs       1",
        f"  checkpoint  step 5: {run}/checkpoints/step_0000005",
        f"  run dir     {run}",
        f"  metrics     {run}/metrics.jsonl",
        f"  events      {run}/events.jsonl",
        f"  loss plot   {run}/loss.png",
        f"  tensorboard tensorboard --logdir {run}/tensorboard",
    ]


def test_run_summary_of_a_halted_run_without_checkpoints(tmp_path):
    metrics = [{"step": 0, "time": 10.0, "loss": float("nan"), "tokens_seen": 64}]
    events = [{"event": "submit", "time": 5.0}, {"event": "start", "time": 6.0},
              {"event": "halt", "time": 10.5, "step": 0}]
    lines = run_summary(metrics, events, tmp_path / "r").splitlines()
    assert lines[0] == "run 'r' halted at step 1 in 6s"
    assert "  restarts    0" in lines and "  checkpoint  none committed" in lines
    assert not any("tensorboard" in line or "loss plot" in line for line in lines)


def test_run_summary_with_nothing_logged(tmp_path):
    assert run_summary([], [], tmp_path / "r").splitlines()[0] == "run 'r' stopped at step 0"
