"""`jobs/pretrain.py --dry-run`: the layout checked and every rank's part built on meta, no Ray.

It exits 0 when the run would start and fit, 1 with the reasons when not; the
layout `moray plan` recommends for the seed's model on 24,960 A100s (the one its
days and cost are for, and the fastest it ranks) passes, given as --set overrides.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moray.platform.config import load_config
from moray.platform.dry_run import dry_run, layout_overrides, render

ROOT = Path(__file__).resolve().parent.parent

# Runs the job's main() in a fresh interpreter and fails if anything imported Ray.
_NO_RAY = """
import runpy, sys
sys.argv = ["jobs/pretrain.py"] + sys.argv[1:]
sys.path.insert(0, "jobs")  # as `python jobs/pretrain.py` has it, for jobs/_common.py
try:
    runpy.run_path("jobs/pretrain.py", run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
assert "ray" not in sys.modules, "the dry run imported Ray"
sys.exit(code)
"""


def _job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_RAY, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_a_layout_that_runs_exits_0_with_a_table_per_stage():
    run = _job("--config", "configs/gpt4-mini.yaml", "--dry-run")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "dry run: OK, would run on 8 workers" in out
    assert "tp 2 x pp 2 x dp 2, ep 2 = 8 ranks" in out and "micro-batch 1 x 4 microbatches" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("stage"))
    assert header.split()[-2:] == ["total", "MiB"]
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 11]
    assert [r[0] for r in rows] == ["0", "1"]
    assert all(r[2] == "4" and r[3] == "4" for r in rows)  # tp 2 x ep 2 parts per stage, each on one rank


def test_parts_are_built_without_memory_and_counted_as_the_planner_counts():
    from moray.parallel.tensor_memory import TensorMemoryMeter

    cfg = load_config(ROOT / "configs/gpt4-mini.yaml")
    with TensorMemoryMeter("cpu") as meter:
        report = dry_run(cfg)
    assert report.ok, report.problems
    assert meter.peak < 64 * 1024  # meta: the 5.6 MB of weights per rank never exist
    for row in report.rows:
        assert row.params_built == row.params_planned
        assert row.total_bytes >= row.weights_bytes + row.grads_bytes + row.optimizer_bytes


@pytest.mark.parametrize("overrides,says", [
    (["parallel.ep=3"], "ep 3 must divide"),
    (["parallel.microbatches=1"], "1F1B needs at least pp = 2 microbatches"),
])
def test_a_layout_that_cannot_start_exits_1_and_says_why(overrides, says):
    run = _job("--config", "configs/gpt4-mini.yaml", "--dry-run", *sum((["--set", o] for o in overrides), []))
    assert run.returncode == 1 and "dry run: would NOT run" in run.stderr and says in run.stderr, run.stderr


def test_a_layout_that_does_not_fit_names_the_rank_and_what_would_help():
    """The seed's model at tp 8 x pp 15 without expert parallelism: every expert whole on each rank."""
    cfg = load_config(ROOT / "configs/gpt4.yaml", ["parallel.ep=1", "parallel.dp=1"])
    report = dry_run(cfg)
    assert not report.ok and len(report.rows) == 15
    (why,) = report.problems
    assert "GiB per GPU" in why and "36.00 GiB usable on a100-40gb" in why
    assert "activation_checkpointing=true" in why and "moray plan" in why


@pytest.mark.slow
def test_the_layout_moray_plan_recommends_for_the_seed_runs():
    """moray plan --config configs/gpt4.yaml --gpus 24960: the layout its days and cost are for,
    and the fastest one it ranks, passed to the dry run as --set overrides: both would run."""
    from moray.platform.planner.plan import build_plan, resolve_request

    plan = build_plan(resolve_request(load_config(ROOT / "configs/gpt4.yaml"), gpus=24_960))
    for layout in (plan["memory"]["layout"], plan["layouts"]["feasible"][0]):
        overrides = layout_overrides(layout)
        report = dry_run(load_config(ROOT / "configs/gpt4.yaml", overrides))
        print(" ".join(overrides) + "\n" + render(report))
        assert report.ok and report.world_size == 24_960, report.problems
        assert max(r.total_bytes for r in report.rows) <= report.usable_bytes
