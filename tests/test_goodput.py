import math

import pytest

from moray.platform.goodput import (FAILURES_PER_GPU_HOUR, GoodputInputs, closed_form, simulate,
                                    young_daly_interval)


def test_llama3_rate_gives_its_own_mtbf():
    # 419 interruptions in 54 days on 16,384 GPUs: one every ~3.1 hours on that cluster.
    mtbf_h = 1 / (FAILURES_PER_GPU_HOUR * 16_384)
    assert mtbf_h == pytest.approx(54 * 24 / 419)


def test_young_daly_interval():
    assert young_daly_interval(60, 7200) == pytest.approx(math.sqrt(2 * 60 * 7200))


@pytest.mark.parametrize("stall,recovery", [(1, 60), (60, 600), (300, 1800)])
def test_closed_form_agrees_with_monte_carlo(stall, recovery):
    x = GoodputInputs(gpus=25_000, run_days=20, checkpoint_stall_s=stall, recovery_s=recovery)
    cf, mc = closed_form(x), simulate(x, trials=60, seed=1)
    assert mc.goodput == pytest.approx(cf.goodput, rel=0.03)
    assert mc.expected_failures == pytest.approx(cf.expected_failures, rel=0.05)
    parts = cf.lost_to_saving + cf.lost_to_recompute + cf.lost_to_restart
    assert parts + cf.goodput == pytest.approx(1.0, abs=1e-9)


def test_goodput_falls_with_cluster_size_and_save_cost():
    base = dict(run_days=30, checkpoint_stall_s=30, recovery_s=600)
    small = closed_form(GoodputInputs(gpus=1_000, **base)).goodput
    big = closed_form(GoodputInputs(gpus=25_000, **base)).goodput
    assert 0 < big < small < 1
    slow_save = closed_form(GoodputInputs(gpus=25_000, run_days=30, checkpoint_stall_s=300, recovery_s=600))
    assert slow_save.goodput < big


def test_the_optimal_interval_beats_its_neighbours():
    x = dict(gpus=25_000, run_days=30, checkpoint_stall_s=60, recovery_s=600)
    best = closed_form(GoodputInputs(**x))
    for factor in (0.3, 3.0):
        other = closed_form(GoodputInputs(**x, interval_s=best.interval_s * factor))
        assert other.goodput < best.goodput


def test_plan_has_a_goodput_section_for_the_seed_run():
    from moray.platform.config import load_config
    from moray.platform.planner.plan import build_plan, resolve_request

    cfg = load_config("configs/gpt4.yaml")
    req = resolve_request(cfg, gpus=24_960, tokens=13e12, mfu=0.34,
                          options={"simulate_trials": 20, "recovery_s": 600.0, "checkpoint_stall_s": 60.0})
    g = build_plan(req)["goodput"]
    assert g["mtbf_hours"] == pytest.approx(1 / (FAILURES_PER_GPU_HOUR * 24_960))
    assert g["checkpoint_interval_s"] == pytest.approx(young_daly_interval(60.0, g["mtbf_hours"] * 3600))
    assert 0.5 < g["goodput"] < 1
    assert g["simulated_goodput"] == pytest.approx(g["goodput"], rel=0.03)
    assert g["effective_mfu"] == pytest.approx(0.34 * g["goodput"])
    assert g["wall_days"] > g["failure_free_days"]
