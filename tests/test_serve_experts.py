"""What MoE costs in serving, the engine against `moray plan`: KV bytes per token, and the
distinct experts each layer touches per decode step (random routing: the uniform formula;
measured shares: the planner's non-uniform one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from moray.model import build_model
from moray.platform.cli import main as moray_main
from moray.platform.config import load_config
from moray.platform.planner.errors import PlanError
from moray.platform.planner.inference import experts_touched
from moray.serve.engine.config import EngineConfig
from moray.serve.engine.core import EngineCore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from serve_experts import measure, random_prompts, tiny_moe  # noqa: E402

TINY = str(ROOT / "configs" / "tiny.yaml")


def plan_json(capsys, *args: str) -> dict:
    assert moray_main(["plan", "--config", TINY, "--no-seed-check", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_moray_plan_prints_the_engines_kv_bytes_per_token(capsys, dtype):
    cfg = load_config(TINY, [f"serve.dtype={dtype}"])
    core = EngineCore(build_model(cfg.model, seed=0), cfg.model,
                      EngineConfig(kv_block_size=16, kv_cache_blocks=4, dtype=cfg.serve.dtype))
    engine = core.executor.kv_bytes_per_token
    plan = plan_json(capsys, "--set", f"serve.dtype={dtype}")
    assert plan["inference"]["dtype"] == dtype
    assert plan["inference"]["kv_cache_bytes_per_token"] == plan["model"]["kv_cache_bytes_per_token"] == engine
    assert moray_main(["plan", "--config", TINY, "--no-seed-check", "--set", f"serve.dtype={dtype}"]) == 0
    assert f"KV cache         {engine:,} bytes per token" in capsys.readouterr().out


SMALL = dict(d_model=64, n_layers=2, ffn_hidden=128)  # tiny.yaml narrower: routing, not quality, is tested


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: threads only contend on a shared machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def random_moe():
    cfg = tiny_moe(8, **SMALL)  # 8 experts top-2
    return cfg, build_model(cfg, seed=7).eval(), random_prompts(cfg, 64, length=16)


@pytest.mark.parametrize("b", [1, 16, 64])
def test_random_router_touches_what_the_uniform_planner_expects(random_moe, b):
    cfg, model, prompts = random_moe
    m = measure(model, cfg, prompts[:b], decode_steps=8)
    assert m["decode_steps"] == 8
    if b == 1:  # one token runs exactly its top_k experts in every layer
        assert m["measured_per_layer"] == [float(cfg.top_k)] * cfg.n_layers
    assert m["measured"] == pytest.approx(experts_touched(cfg, b), rel=0.10)


def test_shares_reduce_to_uniform_and_fewer_experts_when_skewed():
    cfg = tiny_moe(8)
    uniform = [1 / 8] * 8
    for b in (1, 3, 16, 64):
        assert experts_touched(cfg, b, uniform) == pytest.approx(experts_touched(cfg, b), rel=1e-12)
        assert experts_touched(cfg, b, [uniform] * cfg.n_layers) == pytest.approx(experts_touched(cfg, b))
    skewed = [40, 30, 10, 10, 5, 3, 1, 1]  # counts: normalised per layer
    assert experts_touched(cfg, 1, skewed) == pytest.approx(2)  # one token: still exactly top_k
    assert experts_touched(cfg, 16, skewed) < 0.9 * experts_touched(cfg, 16)
    assert experts_touched(cfg, 10_000, skewed) == pytest.approx(8)
    with pytest.raises(PlanError, match="at most one"):  # top-2: no expert gets over half the assignments
        experts_touched(cfg, 4, [0.7] + [0.3 / 7] * 7)
    with pytest.raises(PlanError, match="8 non-negative shares"):
        experts_touched(cfg, 4, [0.5, 0.5])


def test_moray_plan_takes_measured_shares(capsys):
    base = plan_json(capsys)["inference"]
    skew = [[0.5, 0.3, 0.1, 0.1]]  # tiny.yaml: 4 experts, top-2
    inf = plan_json(capsys, "--set", f"serve.expert_shares={json.dumps(skew)}")["inference"]
    assert base["routing"] == "uniform" and inf["routing"].startswith("measured shares")
    by_batch = {d["batch"]: d for d in inf["decode"]}
    uniform = {d["batch"]: d for d in base["decode"]}
    assert by_batch[1]["experts_touched_per_layer"] == pytest.approx(2)
    assert by_batch[2]["experts_touched_per_layer"] < uniform[2]["experts_touched_per_layer"]
    assert by_batch[2]["memory_bound_s"] < uniform[2]["memory_bound_s"]  # fewer expert weights read
    bad = plan_json(capsys, "--set", "serve.expert_shares=[[1, 0, 0, 0]]")["inference"]
    assert "at most one" in bad["error"]


def test_a_skewed_router_is_what_the_measured_shares_predict():
    # A trained router's skew, made by hand: expert e's gate row scaled by 0.5 .. 25, so the
    # experts with large rows win most tokens. The uniform formula over-counts; the shares do not.
    cfg = tiny_moe(32, **SMALL)
    model = build_model(cfg, seed=7).eval()
    with torch.no_grad():
        for layer in model.layers.values():
            layer.feed_forward.gate.weight.mul_(5 * torch.logspace(-1, 0.7, cfg.n_experts)[:, None])
    prompts = random_prompts(cfg, 64, length=16)
    for b in (16, 64):
        m = measure(model, cfg, prompts[:b], decode_steps=16)
        assert m["measured"] < 0.7 * experts_touched(cfg, b)
        assert m["measured"] == pytest.approx(experts_touched(cfg, b, m["shares"]), rel=0.10)
