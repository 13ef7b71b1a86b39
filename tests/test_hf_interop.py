"""Hugging Face Mixtral interop, checked against transformers itself: parity, round trips, RoPE, CLI."""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding  # noqa: E402

from moray.model import ModelConfig, RopeScaling, build_model  # noqa: E402
from moray.model.hf import (  # noqa: E402
    CheckpointError, config_from_hf, config_to_hf, convert_hf_to_moray, convert_moray_to_hf, from_hf_module_state,
    load_hf_dir, load_moray_dir, save_hf_dir, save_moray_dir, to_hf_module_state,
)
from moray.model.layers import rope_inv_freq, rope_tables  # noqa: E402
from moray.platform.cli import main as moray_cli  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", module="transformers")


def hf_model(n_kv_heads=2, tie=False, **kw) -> MixtralForCausalLM:
    torch.manual_seed(n_kv_heads)
    cfg = MixtralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=n_kv_heads, head_dim=16, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=64, rope_theta=10000.0,
                        tie_word_embeddings=tie, **kw)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # weights large enough that attention is sharp and routing matters
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.15)
    return model


def moray_model(**kw) -> torch.nn.Module:
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, ffn_hidden=96,
                n_experts=4, top_k=2, max_seq_len=64, init_std=0.15)
    return build_model(ModelConfig(**{**base, **kw}), seed=5).eval()


def logits_diff(ours, theirs, tokens) -> float:
    with torch.no_grad():
        return (ours(tokens) - theirs(tokens).logits).abs().max().item()


TOKENS = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n_kv_heads", [1, 2, 8])
def test_parity_with_mixtral_from_a_save_pretrained_dir(tmp_path, n_kv_heads):
    hf = hf_model(n_kv_heads)
    hf.save_pretrained(tmp_path)
    cfg, sd = load_hf_dir(tmp_path)
    assert (cfg.n_kv_heads, cfg.n_heads, cfg.head_dim, cfg.n_experts) == (n_kv_heads, 8, 16, 4)
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd)
    with torch.no_grad():
        assert hf(TOKENS).logits.abs().max() > 1.0
    assert logits_diff(ours, hf, TOKENS) <= 1e-4
    # The test can fail: gate and up projections swapped give visibly different logits.
    swapped = dict(sd, **{"layers.0.feed_forward.experts.w1": sd["layers.0.feed_forward.experts.w3"],
                          "layers.0.feed_forward.experts.w3": sd["layers.0.feed_forward.experts.w1"]})
    ours.load_state_dict(swapped)
    assert logits_diff(ours, hf, TOKENS) > 1e-2


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"n_kv_heads": 1, "z_loss_coef": 0.01, "capacity_factor": 1.5}])
def test_moray_to_hf_to_moray_is_exact_through_transformers(tmp_path, kw):
    ours = moray_model(**kw)
    save_hf_dir(tmp_path / "hf", ours.cfg, ours.state_dict())
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    if not ours.cfg.capacity_factor:  # HF is dropless; with capacity the models differ by design
        assert logits_diff(ours, hf, TOKENS) <= 1e-4
    hf.save_pretrained(tmp_path / "again")  # transformers writes the hub format back
    cfg, sd = load_hf_dir(tmp_path / "again")
    assert cfg == ours.cfg
    original = ours.state_dict()
    assert sd.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(sd[k], v), k


def test_in_memory_twin_has_the_same_logits_and_gradients():
    ours = moray_model(n_kv_heads=1, aux_loss_coef=0.0, z_loss_coef=0.0)  # HF adds no router loss by default
    hf = MixtralForCausalLM(MixtralConfig(**{k: v for k, v in config_to_hf(ours.cfg).items()
                                             if k != "architectures"})).eval()
    hf.load_state_dict(to_hf_module_state(ours.cfg, ours.state_dict(), hf.state_dict().keys()))
    assert logits_diff(ours, hf, TOKENS) <= 1e-4
    targets = TOKENS.roll(-1, dims=1)
    for model, logits in ((ours, lambda: ours(TOKENS)), (hf, lambda: hf(TOKENS).logits)):
        torch.nn.functional.cross_entropy(logits().flatten(0, 1), targets.flatten()).backward()
    theirs = from_hf_module_state(ours.cfg, {k: p.grad for k, p in hf.named_parameters()})
    for name, p in ours.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0, name
        assert (p.grad - theirs[name]).abs().max().item() <= 1e-4 * scale, name


def test_cli_round_trip_of_a_sharded_hub_checkpoint_is_byte_exact(tmp_path, capsys):
    convert_main = moray_cli
    hf = hf_model(2)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0"}')
    assert convert_main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m"),
                         "--max-shard-size", "150KB"]) == 0
    assert convert_main(["convert", "--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "hf2")]) == 0
    assert "converted moray" in capsys.readouterr().out
    assert (tmp_path / "hf2" / "tokenizer.json").read_text() == '{"version": "1.0"}'  # carried both ways
    assert sorted(p.name for p in (tmp_path / "hf2").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    cfg, sd = load_moray_dir(tmp_path / "m")
    assert len(json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]) == len(sd)
    before = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        before.update(load_file(f))
    after = load_file(tmp_path / "hf2" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    back = MixtralForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        assert torch.equal(back(TOKENS).logits, hf(TOKENS).logits)
    assert convert_main(["convert", "--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "hf2")]) == 2
    assert "not empty; choose a new --out or pass --overwrite" in capsys.readouterr().err
    assert convert_main(["convert", "--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "hf2"), "--overwrite",
                         "--dtype", "bfloat16"]) == 0
    assert load_file(tmp_path / "hf2" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    assert convert_main(["convert", "--to-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "x")]) == 2
    assert "not a moray checkpoint directory (it has a config.json" in capsys.readouterr().err


def test_moray_dir_round_trip_with_dtype(tmp_path):
    ours = moray_model(tie_embeddings=True)
    save_moray_dir(tmp_path / "m", ours.cfg, ours.state_dict(), dtype=torch.bfloat16)
    cfg, sd = load_moray_dir(tmp_path / "m")
    assert cfg == ours.cfg and sd["output.weight"] is sd["tok_embeddings.weight"]
    assert all(torch.equal(sd[k], v.bfloat16()) for k, v in ours.state_dict().items())
    convert_moray_to_hf(tmp_path / "m", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    convert_hf_to_moray(tmp_path / "hf", tmp_path / "m2", dtype=torch.float32)
    cfg2, sd2 = load_moray_dir(tmp_path / "m2")
    assert cfg2 == cfg and all(torch.equal(sd2[k], v.float()) for k, v in sd.items())


# ---------------------------------------------------------------- rotary scaling


ROPES = [RopeScaling("linear", 4.0), RopeScaling("yarn", 4.0, original_max_seq_len=16),
         RopeScaling("yarn", 8.0, original_max_seq_len=512, beta_fast=16.0, beta_slow=2.0)]


@pytest.mark.parametrize("scaling", ROPES, ids=["linear", "yarn", "yarn-betas"])
def test_rope_scaling_matches_transformers(scaling):
    cfg = ModelConfig(d_model=256, n_heads=2, head_dim=128, n_experts=4, max_seq_len=4096,
                      rope_theta=500000.0, rope_scaling=scaling)
    hf_cfg = MixtralConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"})
    emb = MixtralRotaryEmbedding(hf_cfg)
    assert emb.rope_type == scaling.type
    inv_freq, scale = rope_inv_freq(cfg)
    torch.testing.assert_close(emb.inv_freq.double(), inv_freq, rtol=1e-6, atol=0)
    assert emb.attention_scaling == pytest.approx(scale, rel=1e-12)
    cos, sin = emb(torch.zeros(1), torch.arange(256)[None])  # HF's float32 positions drift past ~1k
    ours_cos, ours_sin = rope_tables(cfg)
    torch.testing.assert_close(cos[0], ours_cos[:256], rtol=0, atol=5e-5)
    torch.testing.assert_close(sin[0], ours_sin[:256], rtol=0, atol=5e-5)
    assert config_from_hf(hf_cfg.to_dict()).rope_scaling == scaling


@pytest.mark.parametrize("scaling", ROPES[:2], ids=["linear", "yarn"])
def test_rope_scaled_logits_match_transformers(tmp_path, scaling):
    ours = moray_model(rope_scaling=scaling)
    save_hf_dir(tmp_path, ours.cfg, ours.state_dict())
    hf = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    long_tokens = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(1))
    assert logits_diff(ours, hf, long_tokens) <= 1e-4
    unscaled = moray_model()  # same weights (same seed), no scaling: the test sees the difference
    assert logits_diff(unscaled, hf, long_tokens) > 1e-2


# ---------------------------------------------------------------- refusals


def test_configs_moray_cannot_represent_are_refused_by_name():
    good = json.loads(MixtralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=96, num_hidden_layers=2).to_json_string())
    assert config_from_hf(good).d_model == 64
    for patch, needle in [({"sliding_window": 4096, "max_position_embeddings": 32768}, "sliding_window=4096"),
                          ({"hidden_act": "gelu"}, "hidden_act"), ({"model_type": "llama"}, "model_type"),
                          ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
                          ({"rope_scaling": {"type": "yarn", "factor": 4.0, "attention_factor": 2.0}}, "attention_factor"),
                          ({"quantization_config": {"quant_method": "awq"}}, "quantized"),
                          ({"num_local_experts": 1}, "num_local_experts")]:
        with pytest.raises(ValueError, match=needle):
            config_from_hf({**good, **patch})
    with pytest.raises(ValueError, match="dense"):
        config_to_hf(ModelConfig(n_experts=1))
    with pytest.raises(ValueError, match="mlp='gelu'"):
        config_to_hf(ModelConfig(n_experts=4, mlp="gelu"))


def test_missing_or_unexpected_tensors_are_named(tmp_path):
    ours = moray_model()
    sd = ours.state_dict()
    sd.pop("layers.1.feed_forward.experts.w2")
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.experts\.w2"):
        save_hf_dir(tmp_path / "a", ours.cfg, sd)
    hf_model(2).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    with pytest.raises(CheckpointError, match=r"missing .*experts\.4\.w1\.weight.*\(24 in all\)"):
        load_hf_dir(tmp_path / "hf")
