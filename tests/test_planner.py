"""The capacity planner (`moray plan`), checked against published figures from
independent sources, against moray's own model and trainer, and for its errors.

Sources of the published figures:
- Mixtral-8x7B: 46.7B total, 12.9B active parameters (Mistral AI, "Mixtral of experts", 2023).
- GPT-3 175B on 300B tokens: 3.14e23 training FLOPs (Brown et al. 2020, table D.1).
- Llama-2-70B (80 layers, 8 KV heads of 128): KV cache 327,680 bytes per token in bf16;
  68.98B parameters (Touvron et al. 2023; the Hugging Face checkpoint's 137,953,296,384 bf16 bytes).
- PaLM 540B: 238.3k tokens/s on 6,144 TPU v4 (275 TFLOP/s) is 46.2% MFU (Chowdhery et al. 2022, table 3).
- ZeRO: a 7.5B model on 64 GPUs needs 120 GB of model states per GPU unsharded, 31.4 GB with
  optimizer-state partitioning (Rajbhandari et al. 2020, figure 1).
- Megatron-LM: the attention-score term of training FLOPs is 72 B s l h^2 * s / (6 h) per
  iteration (Narayanan et al. 2021, eq. 3, without recomputation).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moray.model.config import ModelConfig
from moray.model.params import count_params
from moray.parallel.config import ParallelConfig
from moray.platform.cli import main as moray_main
from moray.platform.config import load_config
from moray.platform.planner import (PlanError, build_plan, estimate_memory, estimate_memory_per_stage,
                                    flops_per_token, kv_cache_bytes_per_token, load_catalogue, mfu, peak_flops,
                                    pipeline_bubble, resolve_request, stage_layer_counts, training_flops,
                                    training_flops_with_attention)
from moray.platform.planner.inference import ServePlan, ServeSetup, experts_touched
from moray.platform.planner.catalogue import get_accelerator
from moray.platform.planner.memory import PipelineRank, rank_params

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

GPT3 = ModelConfig(vocab_size=50257, d_model=12288, n_layers=96, n_heads=96, n_kv_heads=96, ffn_hidden=49152,
                   mlp="gelu", n_experts=1, tie_embeddings=True, max_seq_len=2048)
LLAMA2_70B = ModelConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672,
                         mlp="swiglu", n_experts=1, max_seq_len=4096)
PALM_540B = ModelConfig(vocab_size=256000, d_model=18432, n_layers=118, n_heads=48, n_kv_heads=1, head_dim=256,
                        ffn_hidden=73728, mlp="swiglu", n_experts=1, tie_embeddings=True, max_seq_len=2048)


def close(ours: float, published: float, rel: float = 0.01) -> bool:
    return abs(ours / published - 1) <= rel


# ---------------------------------------------------------------- published figures


def test_mixtral_parameters_match_mistral():
    cfg = load_config(CONFIGS / "mixtral-8x7b.yaml")
    r = resolve_request(cfg, gpus=64, tokens=1e12, seed_check=False)
    model = build_plan(r)["model"]
    assert close(model["total_params"], 46.7e9) and close(model["active_params"], 12.9e9)


def test_gpt3_training_flops_match_the_paper():
    assert close(training_flops(GPT3, 300e9), 3.14e23)
    # With attention scores the count grows by PaLM's 12 L H Q T per token.
    extra = training_flops_with_attention(GPT3, 300e9, 2048) - training_flops(GPT3, 300e9)
    assert close(extra, 12 * 96 * 12288 * 2048 * 300e9)


def test_attention_term_matches_megatron_formula():
    l, h, s = GPT3.n_layers, GPT3.d_model, 2048
    megatron_per_token = 72 * l * h**2 * (s / (6 * h))  # eq. 3's attention-score part, per token
    assert close(3 * (flops_per_token(GPT3, s) - flops_per_token(GPT3, 0)), megatron_per_token, 1e-9)


def test_llama2_70b_kv_cache_and_parameters():
    assert kv_cache_bytes_per_token(LLAMA2_70B, 2) == 327_680
    assert close(count_params(LLAMA2_70B).total, 137_953_296_384 / 2)


def test_palm_540b_mfu_matches_the_paper():
    assert close(count_params(PALM_540B).total, 540e9)
    assert close(mfu(238.3e3, PALM_540B, 2048, 6144, 275e12), 0.462)


def test_zero_paper_model_state_bytes():
    cfg = ModelConfig(vocab_size=32000, d_model=4096, n_layers=36, n_heads=32, n_kv_heads=32, ffn_hidden=16384,
                      mlp="gelu", n_experts=1, max_seq_len=2048)
    par = ParallelConfig(tp=1, pp=1, dp=64)
    states = []
    for zero in (0, 1):
        m = estimate_memory(cfg, par, 1, 2048, "bfloat16", zero=zero)
        states.append((m.weights_bytes + m.grads_bytes + m.optimizer_bytes) / m.params)
    assert close(states[0], 120e9 / 7.5e9) and close(states[1], 31.4e9 / 7.5e9)


def test_datasheet_peaks_and_override():
    assert peak_flops("a100-40gb") == 312e12 and peak_flops("h100-80gb") == 989e12
    assert peak_flops("cpu", override=5e10) == 5e10
    with pytest.raises(PlanError, match="did you mean h100-80gb"):
        peak_flops("h100-80")


# ---------------------------------------------------------------- agreement with the model and trainer


def test_rank_parameters_add_up_to_the_model():
    cfg = load_config(CONFIGS / "gpt4.yaml").model
    pc = count_params(cfg)
    tp, ep, pp = 8, 16, 15
    counts = stage_layer_counts(cfg, pp, 8192)
    ranks = [PipelineRank(n, s == 0, s == pp - 1) for s, n in enumerate(counts)]
    assert sum(rank_params(cfg, tp, ep, r, pp).expert for r in ranks) * tp * ep == pc.experts
    assert sum(rank_params(cfg, 1, 1, r, pp).total for r in ranks) == pc.total


def test_stage_split_is_the_trainers():
    from moray.parallel.pipeline import partition_layers

    for name in ("tiny", "gpt4", "mixtral-8x7b"):
        cfg = load_config(CONFIGS / f"{name}.yaml").model
        for pp in sorted({p for p in (1, 2, 3, 5, 15) if p <= cfg.n_layers}):
            assert stage_layer_counts(cfg, pp, 2048) == [len(r) for r in partition_layers(cfg, pp, 2048)]


def test_pipeline_bubble():
    assert pipeline_bubble(4, 12) == pytest.approx(3 / 15)
    assert pipeline_bubble(1, 8) == 0
    assert pipeline_bubble(4, 12, virtual_stages=2) == pytest.approx(3 / 27)


def test_activation_estimate_equals_saved_tensors_of_the_model():
    torch = pytest.importorskip("torch")
    from moray.model import build_model

    cfg = load_config(CONFIGS / "tiny.yaml").model
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 64))
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
    est = estimate_memory(cfg, ParallelConfig(), micro_batch_size=2, seq_len=64, dtype="float32", zero=0)
    assert est.activations_bytes == pytest.approx(sum(saved.values()), rel=0.01)


def test_memory_follows_the_layout():
    cfg = load_config(CONFIGS / "tiny.yaml").model
    kw = dict(micro_batch_size=4, seq_len=128, dtype="float32")
    one = estimate_memory(cfg, ParallelConfig(dp=1, zero=1), **kw)
    two = estimate_memory(cfg, ParallelConfig(dp=2, zero=1), **kw)
    assert two.optimizer_bytes == pytest.approx(one.optimizer_bytes / 2)
    assert two.weights_bytes == one.weights_bytes == 4 * one.params  # float32: 4 bytes, Adam 8, no master
    assert one.optimizer_bytes == 8 * one.params
    ep = estimate_memory(cfg, ParallelConfig(pp=2, ep=2, dp=2, microbatches=4), **kw)
    assert ep.params < one.params / 2
    stages = estimate_memory_per_stage(cfg, ParallelConfig(pp=2, dp=1, microbatches=4), **kw)
    assert [s.microbatches_in_flight for s in stages] == [2, 1]  # 1F1B: min(pp - stage, m)
    gpipe = estimate_memory(cfg, ParallelConfig(pp=2, dp=1, microbatches=4, schedule="gpipe"), **kw)
    assert gpipe.microbatches_in_flight == 4
    ckpt = estimate_memory(cfg, ParallelConfig(dp=1), activation_checkpointing=True, **kw)
    assert ckpt.activations_bytes < one.activations_bytes and ckpt.recompute_bytes > 0
    tp = estimate_memory(cfg, ParallelConfig(tp=2, dp=1), **kw)
    assert tp.activations_bytes < one.activations_bytes and tp.params < one.params
    with pytest.raises(PlanError, match="dp"):
        estimate_memory(cfg, ParallelConfig(zero=1), **kw)


# ---------------------------------------------------------------- the plan


@pytest.fixture(scope="module")
def gpt4_plan():
    cfg = load_config(CONFIGS / "gpt4.yaml")
    return build_plan(resolve_request(cfg, gpus=24_960, tokens=13e12, price_per_gpu_hour=1.0, days=95))


def test_json_sections_and_keys(gpt4_plan):
    assert {"model", "training", "memory", "layouts", "inference", "seed_check"} <= set(gpt4_plan)
    for section, key in [("model", "total_params"), ("model", "active_params"), ("model", "forward_flops_per_token"),
                         ("model", "kv_cache_bytes_per_token"), ("training", "training_flops"),
                         ("training", "training_flops_with_attention"), ("training", "gpu_hours"),
                         ("training", "days"), ("training", "cost_usd"), ("memory", "bytes_per_gpu"),
                         ("inference", "cost_usd_per_1k_tokens")]:
        assert isinstance(gpt4_plan[section][key], (int, float)), (section, key)
    keys = set()

    def walk(node):
        if isinstance(node, dict):
            keys.update(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(gpt4_plan)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", k) for k in keys), sorted(k for k in keys if not k.islower())
    json.dumps(gpt4_plan)


def test_days_and_implied_mfu_agree(gpt4_plan):
    t = gpt4_plan["training"]
    assert t["days"] == pytest.approx(t["training_flops_with_attention"] / (24_960 * 312e12 * 0.40) / 86400)
    assert t["cost_usd"] == pytest.approx(t["gpu_hours"] * 1.0)
    assert t["implied_mfu"] == pytest.approx(0.40 * t["days"] / 95)


def test_layouts_fit_and_are_ranked(gpt4_plan):
    lay = gpt4_plan["layouts"]
    usable = gpt4_plan["memory"]["usable_bytes_per_gpu"]
    assert lay["feasible"] and all(c["bytes_per_gpu"] <= usable for c in lay["feasible"])
    mfus = [c["step"]["modeled_mfu"] for c in lay["feasible"]]
    assert mfus == sorted(mfus, reverse=True)
    assert all(c["tp"] <= 8 and c["tp"] * c["pp"] * c["dp"] == 24_960 for c in lay["feasible"])
    assert all(r["reason"] for r in lay["rejected"])


def test_seed_check_says_gflop_and_matches_the_seed(gpt4_plan):
    rows = {r["claim"]: r for r in gpt4_plan["seed_check"]["rows"]}
    fwd = rows["forward FLOPs per token"]
    assert "GFLOP" in fwd["note"] and fwd["verdict"].startswith("unit slip")
    assert 550e9 < fwd["ours"] < 600e9
    for claim in ("total parameters", "active parameters per token", "training FLOPs on 13T tokens (6ND)",
                  "days on 25,000 A100 at 32-36% MFU", "MFU that 90-100 days implies",
                  "parameters per 8-GPU node (TP 8 x PP 16)"):
        assert rows[claim]["verdict"] == "agrees", rows[claim]
    assert "24,960" in rows["TP 8 x PP 15, ZeRO-1, on 40 GB A100s"]["note"]


def test_inference_bounds(gpt4_plan):
    inf = gpt4_plan["inference"]
    assert (inf["tp"], inf["pp"]) == (8, 16)  # the fewest GPUs with KV room: the seed's 128
    assert inf["kv_cache_bytes_per_token"] == 2 * 120 * 1 * 128 * 2
    rows = inf["decode"]
    assert rows[0]["bound"] == "memory"
    assert [r["tokens_per_s"] for r in rows] == sorted(r["tokens_per_s"] for r in rows)
    cfg = load_config(CONFIGS / "gpt4.yaml").model
    assert experts_touched(cfg, 1) == pytest.approx(2) and experts_touched(cfg, 10_000) == pytest.approx(16)


def test_dense_decode_turns_compute_bound_at_large_batch():
    plan = ServePlan(ServeSetup(LLAMA2_70B, get_accelerator("h100-80gb"), 8, 1, 512, 2.0))
    small, large = plan.decode(1), plan.decode(plan.max_batch())
    assert small.bound == "memory" and large.bound == "compute"
    assert large.cost_usd_per_1k_tokens < small.cost_usd_per_1k_tokens


# ---------------------------------------------------------------- a request the cluster cannot run still gets a plan


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    code = moray_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def plan_json(*args: str, capsys) -> dict:
    code, out, err = run_cli("plan", *args, "--json", capsys=capsys)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def gpt4_model_only(tmp_path_factory) -> str:
    """configs/gpt4.yaml's model section and nothing else: what someone asking 'how big, how costly' writes."""
    import yaml

    f = tmp_path_factory.mktemp("plan") / "gpt4-model.yaml"
    f.write_text(yaml.safe_dump({"model": yaml.safe_load((CONFIGS / "gpt4.yaml").read_text())["model"]}))
    return str(f)


@pytest.fixture(scope="module")
def gpt4_model_only_plan(gpt4_model_only) -> dict:
    """The model-only config on 16,384 H100s, every training input left to the planner."""
    cfg = load_config(gpt4_model_only)
    return build_plan(resolve_request(cfg, gpu="h100-80gb", gpus=16_384, seed_check=False,
                                      options={"simulate_trials": 0}))


def test_model_only_config_gets_every_section(gpt4_model_only, gpt4_model_only_plan, capsys):
    code, out, err = run_cli("plan", "--config", gpt4_model_only, "--gpus", "16384", "--gpu", "h100-80gb",
                             "--no-seed-check", "--simulate-trials", "0", capsys=capsys)
    assert code == 0 and err == ""
    for heading in ("\nModel\n", "\nTraining: ", "\nMemory per GPU: ", "\nLayouts on 16,384 GPUs", "\nInference: ",
                    "\nGoodput: "):
        assert heading in out, heading
    assert "total parameters           1.87T" in out and "KV cache per token         61,440 bytes" in out
    # The default layout (tp 1 x pp 1 x ep 1) cannot run: 16,384 data-parallel ranks want more sequences
    # than the planned batch holds. The plan says so and trains with the fastest layout that fits, by
    # name, in the memory and training sections alike.
    plan = gpt4_model_only_plan
    mem, t = plan["memory"], plan["training"]
    best = plan["layouts"]["feasible"][0]
    etp = f" etp{best['etp']}" if best["etp"] != best["tp"] else ""  # experts whole, ep over tp x dp
    label = f"tp{best['tp']} pp{best['pp']} ep{best['ep']}{etp} dp{best['dp']}"
    assert "as configured    tp 1 x pp 1 x ep 1 on 16,384 GPUs: not runnable" in out
    assert "why not          dp 16384 x seq_len 8192 is more than the global batch" in out
    assert f"runs instead     {label}" in out
    assert f"layout                   {label}, the fastest layout that fits 16,384 x h100-80gb" in out
    assert "the days are for it" in out
    assert mem["configured"]["runnable"] is False and "global batch" in mem["configured"]["problem"]
    assert mem["chosen"]["label"] == t["layout"] == label
    assert mem["layout"]["gpus"] == t["gpus"] == 16_384 and mem["bytes_per_gpu"] <= mem["usable_bytes_per_gpu"]
    assert plan["model"]["kv_cache_bytes_per_token"] == plan["inference"]["kv_cache_bytes_per_token"] == 61_440
    assert "error" not in plan["goodput"] and plan["goodput"]["gpus"] == 16_384


def test_model_only_config_plans_a_pretraining_run(gpt4_model_only, gpt4_model_only_plan):
    """No train section: Chinchilla's tokens at 8k in bf16, priced at the catalogue's assumed rate,
    each figure saying where it came from."""
    from moray.platform.planner.report import render_plan

    plan = gpt4_model_only_plan
    model_cfg = load_config(gpt4_model_only).model
    active = count_params(model_cfg).active
    t, mem, inputs = plan["training"], plan["memory"], plan["inputs"]
    assert t["tokens"] == 20 * active and "20 x active parameters (Chinchilla)" in t["tokens_source"]
    assert t["seq_len_tokens"] == plan["model"]["seq_len_tokens"] == 8192 == model_cfg.max_seq_len
    assert "model.max_seq_len" in t["seq_len_assumed"]
    # bf16 memory: 2-byte weights and grads, fp32 master and Adam (16 bytes before ZeRO).
    assert mem["dtype"] == "bfloat16" and mem["bytes_per_param"] == 16 and "train.dtype" in mem["dtype_assumed"]
    assert all(s["weights_bytes"] == 2 * s["params"] for s in mem["stages"])
    # Days from first principles: 3 x forward FLOPs (attention at 8k counted) x 20 N / (GPUs x peak x MFU).
    flops = 3 * flops_per_token(model_cfg, 8192) * 20 * active
    days = flops / (16_384 * 989e12 * 0.40) / 86400
    assert t["days"] == pytest.approx(days) and 5 < days < 60  # weeks, not minutes (the seed's 13T: ~100 days)
    price = get_accelerator("h100-80gb").price_per_gpu_hour
    assert price and t["price_usd_per_gpu_hour"] == price and t["cost_usd"] == pytest.approx(price * t["gpu_hours"])
    assert t["price_assumed"] == "assumed for h100-80gb; pass --price-per-gpu-hour"
    assert plan["inference"]["price_assumed"] == t["price_assumed"]
    # The batch: DeepSeek LLM's 0.292 x C^0.3271, whole sequences; the layouts are searched with it.
    assert t["batch_tokens"] % 8192 == 0 and t["batch_tokens"] == inputs["batch_tokens"]
    assert t["batch_tokens"] == pytest.approx(0.292 * t["training_flops_with_attention"] ** 0.3271, abs=8192)
    assert "set train.batch_tokens" in t["batch_assumed"]
    out = render_plan(plan, "model only")
    for line in (f"  tokens                   {t['tokens'] / 1e12:.3g}T  (20 x active parameters (Chinchilla); "
                 "pass --tokens)",
                 "  sequence length          8,192 tokens  (assumed: model.max_seq_len; set train.seq_len)",
                 f"at ${price:g}/GPU-hour (assumed for h100-80gb; pass --price-per-gpu-hour)",
                 "  dtype            bfloat16 (assumed: large runs train in bfloat16; set train.dtype)",
                 "(assumed: 0.292 x C^0.3271 at C = ", "at 8,192 tokens (assumed, see Training)"):
        assert line in out, line
    assert re.search(r"\n  cost +\$[\d.,]+M  \(6ND: \$[\d.,]+M\) at \$", out)


def test_planning_defaults_only_fill_what_the_file_leaves_out(gpt4_model_only):
    """A train section's own keys win; `model_fields_set` tells 'not in the file' from 'the default'."""
    assert load_config(gpt4_model_only).train.model_fields_set == set()
    assert load_config(gpt4_model_only, ["train.dtype=float32"]).train.model_fields_set == {"dtype"}
    r = resolve_request(load_config(gpt4_model_only, ["train.dtype=float32", "train.seq_len=4096"]),
                        gpu="h100-80gb", gpus=1920, seed_check=False)
    assert (r.dtype, r.dtype_assumed, r.seq_len, r.seq_len_assumed) == ("float32", None, 4096, None)
    capped = resolve_request(load_config(gpt4_model_only, ["model.max_seq_len=32768"]), gpu="h100-80gb",
                             gpus=1920, seed_check=False)
    assert capped.seq_len == 8192 and "model.max_seq_len 32,768 capped at 8,192" in capped.seq_len_assumed
    # A file that gives a batch keeps it (and then plans its own steps' tokens, as before).
    given = resolve_request(load_config(gpt4_model_only, ["train.batch_tokens=16777216"]), gpu="h100-80gb",
                            gpus=1920, seed_check=False)
    assert (given.batch_tokens, given.batch_assumed) == (16_777_216, None)
    assert given.tokens_source.startswith("train.max_steps 100 x the configured batch")


def test_a_config_with_max_steps_keeps_the_trainers_token_count(gpt4_model_only):
    """train.max_steps in the file: tokens are that run's, max_steps x dp x micro-batch x microbatches
    x seq_len, as before the planning defaults; no planned batch."""
    cfg = load_config(CONFIGS / "tiny.yaml")
    t = build_plan(resolve_request(cfg, seed_check=False, options={"simulate_trials": 0}))["training"]
    assert t["tokens"] == 300 * 2 * 4 * 4 * 128 == 1_228_800  # tiny on 4 workers: dp 2 (pp 2), 4 microbatches
    assert t["tokens_source"] == "train.max_steps 300 x the configured batch; pass --tokens"
    assert "batch_tokens" not in t
    r = resolve_request(load_config(gpt4_model_only, ["train.max_steps=10"]), gpu="h100-80gb", gpus=1920,
                        seed_check=False)
    dp = r.layout.chosen.layout.dp
    assert r.batch_tokens is None and r.tokens == 10 * dp * 4 * 2 * r.seq_len  # pp 1: 2 microbatches


def test_an_explicit_price_wins_over_the_catalogue(capsys):
    def priced(*sets, **kw):
        cfg = load_config(CONFIGS / "tiny.yaml", list(sets))
        return build_plan(resolve_request(cfg, gpu="h100-80gb", seed_check=False, options={"simulate_trials": 0},
                                          **kw))["training"]

    assumed = priced()
    assert assumed["price_usd_per_gpu_hour"] == get_accelerator("h100-80gb").price_per_gpu_hour
    assert assumed["price_assumed"] == "assumed for h100-80gb; pass --price-per-gpu-hour"
    for t, price in ((priced("cluster.price_per_gpu_hour=1.25"), 1.25),
                     (priced("cluster.price_per_gpu_hour=1.25", price_per_gpu_hour=0.5), 0.5)):
        assert t["price_usd_per_gpu_hour"] == price and t["price_assumed"] is None
        assert t["cost_usd"] == pytest.approx(price * t["gpu_hours"])
    code, out, _ = run_cli("plan", "--config", str(CONFIGS / "tiny.yaml"), "--gpu", "h100-80gb",
                           "--price-per-gpu-hour", "0.5", "--no-seed-check", "--simulate-trials", "0", capsys=capsys)
    assert code == 0 and re.search(r"\n  cost .* at \$0\.5/GPU-hour\n", out) and "assumed for" not in out

    def serving(**kw):
        cfg = load_config(CONFIGS / "tiny.yaml")
        s = build_plan(resolve_request(cfg, gpu="h100-80gb", serve_gpu="h200", seed_check=False,
                                       options={"simulate_trials": 0}, **kw))["inference"]
        return s["price_usd_per_gpu_hour"], s["price_assumed"]

    # Serving on another card: its own assumed price, unless the request names one.
    assert serving() == (get_accelerator("h200").price_per_gpu_hour, "assumed for h200; pass --price-per-gpu-hour")
    assert serving(price_per_gpu_hour=0.5) == (0.5, None)
    assert get_accelerator("cpu").price_per_gpu_hour is None  # a nominal CPU worker has no list price
    code, out, _ = run_cli("plan", "--config", str(CONFIGS / "tiny.yaml"), "--no-seed-check", "--simulate-trials",
                           "0", capsys=capsys)
    assert "cost                     n/a: pass --price-per-gpu-hour" in out


def test_configured_layout_that_does_not_fit_says_why(gpt4_model_only, capsys):
    """With a batch large enough for 16,384 ranks, tp 1 x pp 1 x ep 1 runs but cannot hold 1.87T parameters."""
    code, out, _ = run_cli("plan", "--config", gpt4_model_only, "--gpus", "16384", "--gpu", "h100-80gb",
                           "--set", "train.batch_tokens=536870912", "--tokens", "13T", "--no-seed-check",
                           "--simulate-trials", "0", capsys=capsys)
    assert code == 0
    assert re.search(r"as configured +tp1 pp1 ep1 dp16384, micro-batch 4: [\d,.]+ GiB on stage 0, does NOT fit", out)
    assert "why not          needs " in out and "runs instead     tp" in out


def test_gpus_not_divisible_by_the_layout(capsys):
    """The configured layout runs on 24,960 of 25,000 GPUs: the plan says why, and uses those."""
    code, out, _ = run_cli("plan", "--config", str(CONFIGS / "gpt4.yaml"), "--gpus", "25000", "--no-seed-check",
                           capsys=capsys)
    assert code == 0
    assert "tp 8 x pp 15 x ep 16 on 25,000 GPUs: not runnable" in out
    assert "not divisible by tp x pp = 120" in out and "24,960 GPUs keep tp 8 x pp 15 x ep 16" in out
    assert "24,960  (--gpus); 40 of 25,000 idle" in out
    t = plan_json("--config", str(CONFIGS / "gpt4.yaml"), "--gpus", "25000", "--no-seed-check", capsys=capsys)["training"]
    assert t["gpus"] == 24_960 and t["cluster_gpus"] == 25_000 and t["layout"] == "tp8 pp15 ep16 dp208"
    assert t["days"] == pytest.approx(t["gpu_hours"] / 24_960 / 24)


def test_layout_that_divides_nothing_falls_back_to_one_that_runs(capsys):
    code, out, _ = run_cli("plan", "--config", str(CONFIGS / "tiny.yaml"), "--set", "parallel.tp=3",
                           "--no-seed-check", capsys=capsys)
    assert code == 0 and "tp 3 x pp 2 x ep 2 on 4 GPUs: not runnable" in out
    assert "but even there: tp 3 does not divide model.n_heads" in out.replace("\n                   ", " ")
    assert re.search(r"runs instead +tp1 pp\d ep\d dp\d", out)


def test_cluster_too_small_for_any_layout(capsys):
    plan = plan_json("--config", str(CONFIGS / "gpt4.yaml"), "--gpus", "100", "--no-seed-check", capsys=capsys)
    mem = plan["memory"]
    assert mem["chosen"] is None and mem["layout"] is None
    assert any("no layout of this model fits 100 x a100-40gb" in a and "fits from 1,920 GPUs" in a
               for a in mem["alternatives"])
    assert plan["training"]["layout"] is None and plan["training"]["days"] > 0
    assert "no training layout fits" in plan["goodput"]["error"]
    assert plan["inference"]["tp"] * plan["inference"]["pp"] == 128  # serving does not depend on the training cluster
    code, out, _ = run_cli("plan", "--config", str(CONFIGS / "gpt4.yaml"), "--gpus", "100", "--no-seed-check",
                           capsys=capsys)
    assert code == 0 and "Goodput\n=======\n  not computed     no training layout fits" in out


def test_tp_larger_than_a_node(capsys):
    code, out, _ = run_cli("plan", "--config", str(CONFIGS / "tiny.yaml"), "--set", "parallel.tp=4",
                           "--gpus-per-node", "2", "--gpus", "8", "--no-seed-check", capsys=capsys)
    assert code == 0 and "spans nodes" in out and "tp <= 2" in out and "what would fit" in out


def test_model_that_cannot_fit(capsys):
    code, out, _ = run_cli("plan", "--config", str(CONFIGS / "gpt4.yaml"), "--set", "parallel.ep=1",
                           "--gpus", "24960", "--no-seed-check", capsys=capsys)
    assert code == 0 and "GiB usable" in out
    assert "ep 4 (--set parallel.ep=4)" in out  # the same layout with expert parallelism fits


def test_a_section_that_cannot_be_built_says_why_in_place(capsys):
    code, out, _ = run_cli("plan", "--config", str(CONFIGS / "tiny.yaml"), "--serve-tp", "3", "--no-seed-check",
                           capsys=capsys)
    assert code == 0 and "Inference\n=========\n  not computed     serving tp 3 must divide" in out
    plan = plan_json("--config", str(CONFIGS / "tiny.yaml"), "--serve-tp", "3", "--no-seed-check", capsys=capsys)
    assert set(plan["inference"]) == {"error"} and "days" in plan["training"] and "goodput" in plan["goodput"]


@pytest.mark.parametrize("args,says", [
    (("--gpu", "a100"), "a100-40gb"),
    (("--mfu", "35"), "(0, 1]"),
    (("--gpus", "0"), "--gpus must be positive"),
    (("--set", "parallel.tp=0"), "parallel.tp must be at least 1"),
])
def test_malformed_request_exits_2_with_one_line(args, says, capsys):
    code, out, err = run_cli("plan", "--config", str(CONFIGS / "tiny.yaml"), *args, capsys=capsys)
    assert code == 2 and out == "" and says in err
    assert len(err.splitlines()) == 1 and err.startswith("moray plan: error: ")


def test_malformed_config_exits_2(tmp_path, capsys):
    for text, says in (("model:\n  d_modl: 3\n", "model.d_modl: unknown key"), ("model: [\n", "not valid YAML")):
        f = tmp_path / "bad.yaml"
        f.write_text(text)
        code, out, err = run_cli("plan", "--config", str(f), capsys=capsys)
        assert code == 2 and out == "" and err.startswith("moray plan: error: ") and says in err


def test_kv_cache_counts_in_the_serving_dtype():
    def kv(**sets):
        cfg = load_config(CONFIGS / "tiny.yaml", [f"{k.replace('__', '.')}={v}" for k, v in sets.items()])
        plan = build_plan(resolve_request(cfg, seed_check=False, options={"simulate_trials": 0}))
        assert plan["model"]["kv_cache_bytes_per_token"] == plan["inference"]["kv_cache_bytes_per_token"]
        return plan["model"]["kv_cache_bytes_per_token"], plan["inference"]["weights_bytes_per_gpu"]

    trained_fp32, trained_bf16 = kv(train__dtype="float32"), kv(train__dtype="bfloat16")
    assert trained_fp32 == trained_bf16  # the training dtype does not change what the server holds
    served_fp32, served_bf16 = kv(serve__dtype="float32"), kv(serve__dtype="bfloat16")
    assert served_bf16 == trained_bf16  # serve.dtype defaults to bfloat16
    assert served_bf16[0] * 2 == served_fp32[0] and served_bf16[1] * 2 == served_fp32[1]


# ---------------------------------------------------------------- CLI, catalogue, plot


def test_cli_json_and_human_output(capsys):
    code, out, _ = run_cli("plan", "--config", str(CONFIGS / "tiny.yaml"), "--json", "--tokens", "1.5M",
                           capsys=capsys)
    assert code == 0
    plan = json.loads(out)
    assert plan["training"]["tokens"] == 1.5e6 and plan["inputs"]["gpus"] == 4
    code, out, _ = run_cli("plan", "--config", str(CONFIGS / "tiny.yaml"), "--no-seed-check", capsys=capsys)
    assert code == 0 and "Memory per GPU" in out and "The seed, checked" not in out


def test_catalogue_extends_from_yaml(tmp_path):
    f = tmp_path / "acc.yaml"
    f.write_text("accelerators:\n  h100-nvl:\n    base: h100-80gb\n    memory_gib: 94\n"
                 "  tpu-x:\n    peak_tflops: 100\n    memory_gib: 32\n    memory_bandwidth_gb_per_s: 800\n"
                 "    intra_node_gb_per_s: 100\n    inter_node_gb_per_s: 25\n    source: test\n")
    cat = load_catalogue(f)
    assert cat["h100-nvl"].peak_flops == 989e12 and cat["h100-nvl"].memory_gib == 94
    assert cat["tpu-x"].peak_flops == 100e12 and cat["tpu-x"].price_per_gpu_hour is None
    assert cat["h100-nvl"].price_per_gpu_hour == cat["h100-80gb"].price_per_gpu_hour  # inherited from the base
    f.write_text("accelerators:\n  h100-spot:\n    base: h100-80gb\n    price_per_gpu_hour: 1.1\n")
    assert load_catalogue(f)["h100-spot"].price_per_gpu_hour == 1.1
    f.write_text("accelerators:\n  x:\n    peak_tflop: 1\n")
    with pytest.raises(PlanError, match="unknown keys"):
        load_catalogue(f)


def test_plot_writes_a_png(tmp_path, capsys):
    png = tmp_path / "plan.png"
    code, out, _ = run_cli("plan", "--config", str(CONFIGS / "tiny.yaml"), "--plot", str(png),
                           "--price-per-gpu-hour", "0.1", capsys=capsys)
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_plan_imports_neither_torch_nor_ray():
    code = ("import sys, moray.platform.cli_plan, moray.platform.planner; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    hint = " (a package __init__ on the way, e.g. moray/model/__init__.py, imports torch eagerly: make it lazy)"
    assert done.returncode == 0, done.stderr + hint
