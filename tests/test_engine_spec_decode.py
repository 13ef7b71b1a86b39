"""Speculative decoding in the engine: greedy with n-gram or draft-model drafts equals plain
greedy token for token (mixed requests arriving over time, chunked prefill, prefix hits,
stop tokens, preemption); with temperature, a chi-square test cannot tell the engine's
output from the target's exact distribution, and catches the rule broken on purpose; the
stats count what happened."""

from __future__ import annotations

import pytest
import torch

from moray.model import ModelConfig, build_model
from moray.serve.engine import speculative
from moray.serve.engine.config import EngineConfig
from moray.serve.engine.core import EngineCore
from moray.serve.engine.llm import LLM
from moray.serve.engine.sampling import SamplingParams

CFG = ModelConfig(vocab_size=320, d_model=128, n_layers=2, n_heads=4, n_kv_heads=1, ffn_hidden=128,
                  mlp="swiglu", n_experts=4, top_k=2, max_seq_len=256, init_std=0.1)
DRAFT_CFG = ModelConfig(vocab_size=320, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                        max_seq_len=256, init_std=0.1)
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=7).eval()


@pytest.fixture(scope="module")
def draft():
    return build_model(DRAFT_CFG, seed=8).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 256, (40,), generator=g).tolist()
    out = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 23, 61, 9)]
    repetitive = [5, 6, 7, 8, 9] * 6  # n-gram drafts follow the loop; the model's greedy output copies it
    return out + [shared + [1, 2, 3], shared + [4, 5, 6, 7, 8], repetitive]


def _core(model, draft=None, **kw) -> EngineCore:
    cfg = EngineConfig(**{"kv_block_size": 16, "kv_cache_blocks": 64, "max_batch_tokens": 32, "max_num_seqs": 4,
                          **kw})
    return EngineCore(model, CFG, cfg, draft_model=draft, draft_model_cfg=draft.cfg if draft is not None else None)


def _staggered(core: EngineCore, prompts, params):
    """One more request every other step while earlier ones run; outputs in prompt order."""
    pending, done, step = list(enumerate(prompts)), {}, 0
    while pending or core.has_unfinished_requests():
        if pending and step % 2 == 0:
            i, p = pending.pop(0)
            core.add_request(f"r{i}", p, params[i])
        for out in core.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return [done[f"r{i}"] for i in range(len(prompts))]


def _mixed_params(model, prompts):
    """Greedy params of mixed lengths; one request stops at a token its plain output emits mid-run."""
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (20, 7, 20, 3, 16, 20, 20)]
    plain = LLM.from_core(_core(model)).generate(prompts[2], params[2])[0].token_ids
    params[2] = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[plain[9]])
    return params


@pytest.mark.parametrize("method", ["ngram", "draft", "draft_is_target"])
def test_greedy_speculative_equals_plain_greedy_token_for_token(model, draft, prompts, method):
    params = _mixed_params(model, prompts)
    plain = _staggered(_core(model), prompts, params)
    kw = {"ngram": dict(speculative_method="ngram"), "draft": dict(speculative_method="draft", draft=draft),
          "draft_is_target": dict(speculative_method="draft", draft=model)}[method]
    core = _core(model, **kw)
    spec = _staggered(core, prompts, params)
    for a, b in zip(spec, plain):
        assert a.token_ids == b.token_ids
        assert (a.finish_reason, a.outputs[0].stop_reason) == (b.finish_reason, b.outputs[0].stop_reason)
    assert plain[2].finish_reason == "stop" and len(plain[2].token_ids) <= 10  # the stop cut a verified run
    assert core.stats.prefix_cache_hits >= 16  # the shared prefix was hit under speculation too
    s = core.stats.spec
    assert s.drafted > 0 and s.steps > 0
    assert core.stats.generation_tokens == sum(len(o.token_ids) for o in plain)
    print(f"{method}: {s.to_dict()}")
    if method == "ngram":
        assert s.accepted > 0  # the repetitive prompt's drafts were taken
    if method == "draft_is_target":
        assert s.acceptance_rate > 0.95  # the same weights agree, up to rounding between two paths
    assert core.kv.usage == 0.0
    if core.drafter is not None and hasattr(core.drafter, "kv"):
        assert core.drafter.kv.usage == 0.0 and core.drafter.num_sequences == 0  # the draft's cache is free too


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_preemption_during_speculative_decoding_keeps_outputs(model, prompts, method):
    want = [o.token_ids for o in LLM.from_core(_core(model, kv_cache_blocks=64)).generate(prompts, GREEDY)]
    kw = dict(speculative_method="ngram") if method == "ngram" else dict(speculative_method="draft", draft=model)
    # 7 usable blocks of 16 for 7 requests of up to 81 tokens, all at once
    core = _core(model, kv_cache_blocks=8, max_batch_tokens=64, max_num_seqs=8, **kw)
    got = LLM.from_core(core).generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == want
    assert sum(o.metrics.num_preemptions for o in got) > 0
    assert core.stats.spec.accepted > 0


def test_stats_count_what_verification_did(model, prompts):
    core = _core(model, speculative_method="ngram", speculative_tokens=3)
    outs = LLM.from_core(core).generate(prompts, GREEDY)
    s = core.stats.spec
    assert s is core.spec_stats and (core.stats.spec_drafted, core.stats.spec_accepted) == (s.drafted, s.accepted)
    assert s.emitted == s.accepted + s.steps and 0 < s.accepted <= s.drafted <= 3 * s.steps
    assert 0 < s.acceptance_rate <= 1 and s.mean_accepted_length == pytest.approx(s.accepted / s.steps)
    # every output token came from a plain step (one each) or a verification (1..k + 1 each)
    total = sum(len(o.token_ids) for o in outs)
    assert core.stats.generation_tokens == total and s.emitted <= total
    # a request that asks for logprobs decodes plainly, and gets one logprob per token
    core = _core(model, speculative_method="ngram")
    out = LLM.from_core(core).generate(prompts[-1], SamplingParams(temperature=0.0, max_tokens=10, logprobs=2))[0]
    assert len(out.outputs[0].logprobs) == 10 and core.stats.spec.drafted == 0


def test_config_and_draft_errors(model):
    with pytest.raises(ValueError, match="speculative_method"):
        EngineConfig(speculative_method="medusa")
    with pytest.raises(ValueError, match="speculative_tokens"):
        EngineConfig(speculative_method="ngram", speculative_tokens=0)
    with pytest.raises(ValueError, match="leniency"):
        EngineConfig(speculative_leniency=-0.1)
    assert EngineConfig(draft_model="some/path").speculative_method == "draft"
    with pytest.raises(ValueError, match="needs a draft model"):
        _core(model, speculative_method="draft")
    other = build_model(ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, ffn_hidden=32), seed=0)
    with pytest.raises(ValueError, match="vocabulary has 256 ids but the target's 320"):
        _core(model, speculative_method="draft", draft=other)


# ---------------------------------------------------------------- the output distribution

V = 16
SMALL = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, n_experts=2,
                    max_seq_len=64, init_std=0.3)  # a flat-ish next-token distribution over 16 ids
SMALL_DRAFT = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=16,
                          max_seq_len=64, init_std=0.6)
PROMPT = [3, 1, 4, 15, 9, 2, 6, 5, 8, 7, 0, 10, 12, 11, 14, 13]  # every id once: a 1-gram always drafts
SAMPLED = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
REQUESTS = 2000


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's test of counts against probabilities; cells expected below min_expected pooled."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    expected = probs / probs.sum() * counts.sum()
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    if float(exp[-1]) == 0.0:
        if float(obs[-1]) > 0:
            return 0.0  # tokens the target never emits
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = torch.tensor(float(len(obs) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


@pytest.fixture(scope="module")
def small():
    target = build_model(SMALL, seed=1).eval()
    with torch.no_grad():  # the exact joint of the first two tokens: p(t1 | prompt) p(t2 | prompt, t1)
        p1 = target(torch.tensor([PROMPT]))[0, -1].float().softmax(-1)  # (V,)
        seqs = torch.tensor([PROMPT + [t] for t in range(V)])
        p2 = target(seqs)[:, -1].float().softmax(-1)  # (V, V)
    return target, build_model(SMALL_DRAFT, seed=2).eval(), p1[:, None] * p2


def _first_two_tokens(target, draft_model, **kw) -> tuple[torch.Tensor, EngineCore]:
    """REQUESTS seeded requests of max_tokens 3: token 1 is sampled plainly after the prefill,
    token 2 is the first that speculation emits. Counts over (t1, t2)."""
    cfg = EngineConfig(kv_block_size=8, kv_cache_blocks=2048, max_batch_tokens=4096, max_num_seqs=512, **kw)
    core = EngineCore(target, SMALL, cfg, draft_model=draft_model, draft_model_cfg=SMALL_DRAFT)
    params = [SamplingParams(temperature=SAMPLED.temperature, max_tokens=3, ignore_eos=True, seed=i)
              for i in range(REQUESTS)]
    outs = LLM.from_core(core).generate([PROMPT] * REQUESTS, params)
    counts = torch.zeros(V, V, dtype=torch.float64)
    for o in outs:
        counts[o.token_ids[0], o.token_ids[1]] += 1
    return counts, core


def always_accept(drafts, q, p, generator=None, leniency=0.0):
    """Broken on purpose: every draft passes, then a bonus token from the last position."""
    N, k = drafts.shape
    bonus = torch.multinomial(p[:, k], 1, generator=generator)
    return torch.cat([drafts.to(p.device), bonus], 1), torch.full((N,), k + 1)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_output_follows_the_target_and_a_broken_rule_is_caught(small, method, monkeypatch):
    target, draft_model, joint = small
    kw = dict(speculative_method="ngram", ngram_min_n=1) if method == "ngram" else dict(
        speculative_method="draft")
    counts, core = _first_two_tokens(target, draft_model if method == "draft" else None, **kw)
    s = core.stats.spec
    assert s.steps == REQUESTS and s.drafted == REQUESTS  # every request verified one draft for token 2
    p = chi_square_pvalue(counts, joint)
    print(f"{method}: chi-square p = {p:.3f}, acceptance {s.acceptance_rate:.2f}")
    assert p > 0.01

    monkeypatch.setattr(speculative, "rejection_sample_batch", always_accept)
    broken, core = _first_two_tokens(target, draft_model if method == "draft" else None, **kw)
    assert core.stats.spec.acceptance_rate == 1.0
    assert chi_square_pvalue(broken, joint) < 1e-4


def test_plain_sampling_passes_the_same_test(small):
    """The test's own baseline: the engine without speculation against the same exact joint."""
    target, _, joint = small
    counts, _ = _first_two_tokens(target, None)
    assert chi_square_pvalue(counts, joint) > 0.01
