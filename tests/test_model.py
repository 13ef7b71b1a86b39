"""The MoE transformer's behaviour: causality, KV cache, routing, gradients, counts, init, config errors."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from moray.model import ModelConfig, Transformer, build_model, count_params
from moray.model.moe import MoE, GroupedExperts, _grouped_mm_ok, capacity_keep_mask, grouped_mm, load_balancing_loss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                n_experts=4, top_k=2, max_seq_len=32, init_std=0.2)  # large init: sharp attention
    return ModelConfig(**{**base, **kw})


def preset(name: str) -> ModelConfig:
    return ModelConfig.from_dict(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"])


def expert_output(moe: MoE, x: torch.Tensor, e: int) -> torch.Tensor:
    w = moe.experts
    return (F.silu(x @ w.w1[e]) * (x @ w.w3[e])) @ w.w2[e]


# ---------------------------------------------------------------- forward / inference


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = build_model(small(), seed=1).eval()
    tokens = torch.randint(0, 61, (2, 16))
    changed = tokens.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % 61
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-2  # the change is visible where it may be


@pytest.mark.parametrize("n_kv_heads,batch", [(1, 1), (1, 3), (2, 2), (4, 2)])
def test_kv_cache_prefill_then_decode_equals_full_forward(n_kv_heads, batch):
    torch.manual_seed(0)
    model = build_model(small(n_kv_heads=n_kv_heads), seed=2).eval()
    tokens = torch.randint(0, 61, (batch, 14))
    with torch.no_grad():
        full = model(tokens)
        model.setup_kv_cache(batch)
        steps = [model(tokens[:, :6], input_pos=torch.arange(6)),  # prefill
                 model(tokens[:, 6:9], input_pos=torch.arange(6, 9))]  # a chunk
        steps += [model(tokens[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(9, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=5e-5)
    assert full.abs().max() > 1.0


# ---------------------------------------------------------------- routing and gradients


def _route_with_logits(moe: MoE, logit_rows: torch.Tensor, d_model: int) -> torch.Tensor:
    """Inputs whose router logits are exactly `logit_rows` (gate = identity on the first E dims)."""
    E = logit_rows.shape[1]
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, :E] = torch.eye(E)
    x = torch.randn(logit_rows.shape[0], d_model) * 0.5
    x[:, :E] = logit_rows
    return x


def test_balancing_loss_is_exactly_one_for_uniform_routing():
    cfg = small(d_model=16, n_experts=4, top_k=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.experts.w1), torch.nn.init.normal_(moe.experts.w2), torch.nn.init.normal_(moe.experts.w3)
    # Each token's logits are a cyclic shift of one vector: mean router probability is 1/E for
    # every expert, and the top-2 choices cover every expert equally often.
    shifts = torch.stack([torch.tensor([3.0, 2.0, 1.0, 0.0]).roll(i) for i in range(4)]).repeat(3, 1)
    moe(_route_with_logits(moe, shifts, 16))
    assert moe.last_stats["tokens_per_expert"].tolist() == [6, 6, 6, 6]
    assert moe.last_stats["load_balancing_loss"].item() == pytest.approx(1.0, abs=1e-6)
    # Skewed: every token's choice is experts 0 and 1 -> E * (0.5*0.4 + 0.5*0.3) = 1.4.
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).repeat(8, 1)
    assert load_balancing_loss(probs, probs.topk(2).indices, 4).item() == pytest.approx(1.4, abs=1e-6)


def test_capacity_drops_exactly_the_overflow_first_choices_first():
    expert_ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0], [1, 2]])  # (N=6, k=2), E=3
    keep = capacity_keep_mask(expert_ids, 3, capacity=2)
    # First choices in token order fill the slots (token 2's first choice overflows expert 0), then
    # second choices: only token 1's fits (expert 2); token 0's second choice loses to tokens 3 and 5.
    expected = [[True, False], [True, True], [False, False], [True, False], [True, False], [True, False]]
    assert keep.tolist() == expected

    cfg = small(d_model=16, n_experts=3, top_k=2, capacity_factor=0.5)  # ceil(0.5 * 6 * 2 / 3) = 2 slots
    torch.manual_seed(0)
    moe = MoE(cfg)
    for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
        torch.nn.init.normal_(w, std=0.3)
    logits = torch.full((6, 3), -1.0)
    for t, (first, second) in enumerate(expert_ids.tolist()):
        logits[t, first], logits[t, second] = 2.0, 1.0
    x = _route_with_logits(moe, logits, 16)
    out = moe(x)
    assert moe.capacity(6) == 2 and moe.last_stats["dropped"].item() == 6
    weights = logits.softmax(-1).topk(2).values
    weights = weights / weights.sum(-1, keepdim=True)
    want = torch.zeros_like(x)
    for t in range(6):
        for j in range(2):
            if expected[t][j]:
                want[t] += weights[t, j] * expert_output(moe, x[t], expert_ids[t, j].item())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert out[2].abs().max() == 0  # both of token 2's assignments were dropped


@pytest.mark.parametrize("ffn_hidden", [48, 18])  # 48: grouped_mm kernel; 18 (72-byte rows): per-expert loop
def test_gradients_reach_exactly_the_experts_that_got_tokens(ffn_hidden):
    cfg = small(d_model=16, n_experts=4, top_k=2, ffn_hidden=ffn_hidden)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
        torch.nn.init.normal_(w, std=0.3)
    torch.nn.init.normal_(moe.gate.weight)
    x = torch.randn(20, 16)
    x[:, 15] = 1.0
    with torch.no_grad():  # expert 3's router logit is hopeless for every token
        moe.gate.weight[:, 15] = torch.tensor([0.0, 0.0, 0.0, -100.0])
    assert _grouped_mm_ok(x, moe.experts.w1) == (ffn_hidden == 48)
    (moe(x) * torch.randn(20, 16)).sum().backward()
    counts = moe.last_stats["tokens_per_expert"]
    assert counts[3] == 0 and (counts[:3] > 0).all()
    for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
        norms = w.grad.flatten(1).norm(dim=1)
        assert (norms[:3] > 0).all() and norms[3] == 0
    assert moe.gate.weight.grad.abs().sum() > 0


def test_router_aux_losses_put_their_gradient_in_place():
    cfg = small(d_model=16, n_experts=4, top_k=2, aux_loss_coef=0.3, z_loss_coef=0.05)
    torch.manual_seed(0)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight)
    for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
        torch.nn.init.normal_(w)
    x = torch.randn(24, 16)
    (moe(x) * 0).sum().backward()  # the main loss contributes nothing: only the aux gradient is left
    W = moe.gate.weight.detach().clone().requires_grad_()
    logits = x @ W.t()
    probs = logits.softmax(-1)
    aux = 0.3 / cfg.n_layers * load_balancing_loss(probs, probs.topk(2).indices, 4) \
        + 0.05 / cfg.n_layers * torch.logsumexp(logits, -1).pow(2).mean()
    aux.backward()
    torch.testing.assert_close(moe.gate.weight.grad, W.grad, rtol=1e-5, atol=1e-7)


def _top1_lm_loss(model, tokens):
    return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_top1_router_learns_from_the_lm_loss_only_with_raw_probabilities(norm_topk_prob):
    """Top-1 with renormalisation makes every routing weight exactly 1: the LM loss then gives the
    router nothing, which is why Switch-style top-1 uses the raw probability (norm_topk_prob=false)."""
    cfg = small(top_k=1, norm_topk_prob=norm_topk_prob, aux_loss_coef=0.0, z_loss_coef=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (4, 17))
    _top1_lm_loss(model, tokens).backward()
    gates = [b.feed_forward.gate.weight for b in model.layers.values()]
    router_grad = max(g.grad.norm().item() for g in gates)
    expert_grad = model.layers["0"].feed_forward.experts.w1.grad.norm().item()
    if norm_topk_prob:
        assert router_grad < 1e-6 * expert_grad
        return
    assert router_grad > 1e-3 * expert_grad
    # Train the routers alone: the LM loss falls and the routing decisions move.
    for p in model.parameters():
        p.requires_grad_(p in set(gates))
    before = [g.detach().clone() for g in gates]
    opt = torch.optim.AdamW(gates, lr=5e-2, weight_decay=0.0)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = _top1_lm_loss(model, tokens)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all((g - b).abs().max() > 1e-2 for g, b in zip(gates, before))


def test_mixtral_export_refuses_raw_top_k_probabilities():
    from moray.model.hf_config import config_to_hf

    with pytest.raises(ValueError, match="norm_topk_prob=false; Mixtral always rescales"):
        config_to_hf(small(top_k=1, norm_topk_prob=False))
    assert config_to_hf(small(top_k=1))["num_experts_per_tok"] == 1


def test_grouped_mm_forward_and_backward_equal_the_per_expert_loop():
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 11, 1, 3])  # ragged, one expert empty
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    w = torch.randn(5, 32, 24, requires_grad=True)
    assert _grouped_mm_ok(x, w)  # this really runs torch._grouped_mm
    dy = torch.randn(int(counts.sum()), 24)
    y = grouped_mm(x, w, counts)
    gx, gw = torch.autograd.grad((y * dy).sum(), (x, w))
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = torch.cat([c @ w2[g] for g, c in enumerate(torch.split(x2, counts.tolist()))])
    gx2, gw2 = torch.autograd.grad((y2 * dy).sum(), (x2, w2))
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw2, rtol=1e-5, atol=1e-5)
    assert gw[1].abs().max() == 0  # the empty group's weight gets exactly nothing


# ---------------------------------------------------------------- parameters and init


def test_preset_parameter_counts():
    gpt4, mixtral = count_params(preset("gpt4")), count_params(preset("mixtral-8x7b"))
    assert 1.8e12 <= gpt4.total <= 1.9e12 and 270e9 <= gpt4.active <= 300e9
    assert abs(mixtral.total / 46.7e9 - 1) <= 0.005 and abs(mixtral.active / 12.9e9 - 1) <= 0.005


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"mlp": "gelu"}, {"n_experts": 1},
                                {"n_kv_heads": 4, "head_dim": 16}, {"n_experts": 8, "top_k": 1}])
def test_count_params_matches_a_built_model(kw):
    cfg = small(aux_loss_coef=0.0, z_loss_coef=0.0, **kw)
    model = build_model(cfg)
    n = count_params(cfg)
    assert n.total == sum(p.numel() for p in model.parameters())
    # Active = what one token's forward touches: every tensor it reaches, experts by slice.
    model(torch.tensor([[5]])).sum().backward()
    touched = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if ".experts." in name:
            touched += sum(p[e].numel() for e in range(p.shape[0]) if p.grad[e].abs().sum() > 0)
        else:
            touched += p.numel()
    assert touched == n.active


def test_meta_build_equals_plain_build():
    for cfg in (small(), small(tie_embeddings=True, rope_scaling={"type": "yarn", "factor": 2.0})):
        meta_built = build_model(cfg, seed=7)
        plain = Transformer(cfg)
        plain.init_weights(seed=7)
        assert meta_built.state_dict().keys() == plain.state_dict().keys()
        for (k, a), b in zip(meta_built.state_dict().items(), plain.state_dict().values()):
            assert torch.equal(a, b), k
        torch.testing.assert_close(meta_built.rope_cos, plain.rope_cos, rtol=0, atol=0)
        if cfg.tie_embeddings:
            assert meta_built.output.weight is meta_built.tok_embeddings.weight
        assert not torch.equal(meta_built.state_dict()["layers.0.attention.wq.weight"],
                               build_model(cfg, seed=8).state_dict()["layers.0.attention.wq.weight"])


def test_expert_shard_init_equals_the_slice_of_the_full_model():
    cfg = small(n_experts=8)
    full = build_model(cfg, seed=3)
    shard = Transformer(cfg)
    for layer in shard.layers.values():  # what an expert-parallel rank 1 of 2 holds
        layer.feed_forward.experts = GroupedExperts(4, cfg.d_model, cfg.ffn_hidden, cfg.mlp)
        layer.feed_forward.experts.expert_offset = 4
    shard.init_weights(seed=3)
    for i, layer in shard.layers.items():
        for w in ("w1", "w2", "w3"):
            got = getattr(layer.feed_forward.experts, w)
            assert torch.equal(got, getattr(full.layers[i].feed_forward.experts, w)[4:]), (i, w)


# ---------------------------------------------------------------- config errors


def test_config_errors_name_the_bad_key():
    from moray.platform.config import ConfigError, build_config, load_config

    cases = [({"model": {"n_layer": 3}}, ["model.n_layer", "did you mean model.n_layers"]),
             ({"model": {"n_layers": "four"}}, ["model.n_layers", "'four'"]),
             ({"model": {"mlp": "relu"}}, ["model.mlp", "'swiglu'", "'gelu'"]),
             ({"model": {"rope_scaling": {"type": "ntk", "factor": 2}}}, ["model.rope_scaling.type"]),
             ({"model": {"top_k": 5, "n_experts": 4}}, ["model.top_k"])]
    for raw, needles in cases:
        with pytest.raises(ConfigError) as err:
            build_config(raw)
        assert all(n in str(err.value) for n in needles), (needles, str(err.value))
    for item, needle in [("n_layers=3", "must start with a section"), ("model.n_layers", "expected section.key=value"),
                         ("model.top_k=two", "model.top_k")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(CONFIGS / "tiny.yaml", [item])
    assert load_config(CONFIGS / "tiny.yaml", ["model.rope_scaling={type: yarn, factor: 4}"]).model.rope_scaling.factor == 4


def test_plain_from_dict_checks_keys_and_types_without_pydantic():
    for bad, needle in [({"n_layer": 2}, "model.n_layer: unknown key"), ({"n_layers": "2"}, "model.n_layers: expected int"),
                        ({"mlp": "relu"}, "model.mlp: must be one of"), ({"tie_embeddings": 1}, "model.tie_embeddings"),
                        ({"rope_scaling": {"kind": "yarn"}}, "model.rope_scaling.kind: unknown key"),
                        ({"head_dim": 7}, "model.head_dim")]:
        with pytest.raises(ValueError, match=needle):
            ModelConfig.from_dict(bad)
    assert ModelConfig.from_dict({"rope_theta": 10, "capacity_factor": None}).rope_theta == 10.0
