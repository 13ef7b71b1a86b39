"""The sampler: greedy, temperature, filters, penalties, seeds and logprobs, against their definitions."""

import pytest
import torch

from moray.serve.engine.sampling import Sampler, SamplingParams, apply_penalties

# Chi-square critical values at alpha = 0.001 by degrees of freedom (the sampling is seeded, so a
# test either always passes or always fails; the threshold says how unlikely a pass by chance is).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5])
DRAWS = 20000


def draw(params: SamplingParams, logits=LOGITS, n=DRAWS, seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    out = Sampler().sample(logits.expand(n, -1).clone(), [params] * n, [[] for _ in range(n)], [None] * n)
    return torch.tensor(out.token_ids)


def chi2(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic over the tokens with positive probability."""
    keep = probs > 0
    observed = torch.bincount(tokens, minlength=probs.numel()).double()[keep]
    expected = probs.double()[keep] * tokens.numel()
    return float(((observed - expected) ** 2 / expected).sum())


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1, 1.0, 1.0, 0, 0.0, 16)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.logprobs, p.seed) == (
        0.0, 0.0, 1.0, None, None)
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]


def test_greedy_is_argmax_whatever_the_filters():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.5, seed=i) for i in range(6)]
    out = Sampler().sample(logits, params, [[] for _ in range(6)], [torch.Generator().manual_seed(1)] * 6)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_temperature_sampling_matches_softmax_over_temperature():
    t = 0.7
    tokens = draw(SamplingParams(temperature=t))
    assert chi2(tokens, (LOGITS / t).softmax(-1)) < CHI2_999[7]
    assert chi2(tokens, LOGITS.softmax(-1)) > 10 * CHI2_999[7]  # the test can tell temperatures apart


def _expected(kind: str, value) -> torch.Tensor:
    """The renormalised distribution, computed from the definitions."""
    probs = LOGITS.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    if kind == "top_k":
        kept = order[:value]
    elif kind == "top_p":
        kept, total = [], 0.0
        for i in order:
            kept.append(i)
            total += probs[i].item()
            if total >= value:
                break
    else:  # min_p
        kept = [i for i in order if probs[i] >= value * probs.max()]
    out = torch.zeros_like(probs)
    out[kept] = probs[kept] / probs[kept].sum()
    return out


@pytest.mark.parametrize("kind,value", [("top_k", 3), ("top_p", 0.6), ("top_p", 0.95), ("min_p", 0.2)])
def test_filters_never_emit_masked_tokens_and_renormalise(kind, value):
    expected = _expected(kind, value)
    kept = set(expected.nonzero().flatten().tolist())
    assert 1 < len(kept) < 8
    tokens = draw(SamplingParams(**{kind: value}))
    assert set(tokens.tolist()) <= kept
    assert chi2(tokens, expected) < CHI2_999[len(kept) - 1]


def test_filters_combine_in_vllms_order():
    # min_p 0.2 keeps tokens 0..3, top_k 3 of them; top_p 0.8 over those renormalised (0.51, 0.31,
    # 0.19) keeps 0 and 1 (top_p alone after min_p would keep 0..2).
    tokens = draw(SamplingParams(min_p=0.2, top_k=3, top_p=0.8), n=4000)
    assert set(tokens.tolist()) == {0, 1}


def test_presence_and_frequency_penalties_follow_the_openai_formula():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.3), SamplingParams(presence_penalty=-1.0)]
    history = [[3, 3, 3, 7], [1]]
    got = apply_penalties(logits, params, history)
    want = logits.clone()
    want[0, 3] -= 3 * 0.3 + 0.5
    want[0, 7] -= 1 * 0.3 + 0.5
    want[1, 1] += 1.0
    torch.testing.assert_close(got, want)
    # Through the sampler: a penalty that pushes the top token below the second changes a greedy pick.
    row = torch.tensor([[3.0, 2.5, 0.0]])
    pick = Sampler().sample(row, [SamplingParams(temperature=0, frequency_penalty=0.4)], [[0, 0]], [None])
    assert pick.token_ids == [1]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    got = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], [[0]], prompt_token_ids=[[1]])
    torch.testing.assert_close(got, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))


def test_a_seeded_request_gives_the_same_tokens_in_any_batch():
    g = torch.Generator().manual_seed(5)
    steps = [torch.randn(5, 40, generator=g) for _ in range(6)]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42)

    def run(row: int, batch: int, others_seeded: bool):
        gens = [torch.Generator().manual_seed(1000 + i) if others_seeded else None for i in range(batch)]
        gens[row] = torch.Generator().manual_seed(42)
        ps = [SamplingParams(temperature=0.8, top_k=5)] * batch
        ps[row] = params
        got = []
        for logits in steps:
            rows = logits[:batch].flip(0).clone()  # the other rows: whatever else is in the batch
            rows[row] = logits[0]  # the seeded request's logits, wherever it sits
            got.append(Sampler().sample(rows, ps, [[] for _ in range(batch)], gens).token_ids[row])
        return got

    alone = run(0, 1, False)
    assert run(3, 5, True) == alone and run(2, 4, False) == alone
    assert len(set(alone)) > 1  # it did sample


def test_logprobs_are_the_raw_models_log_softmax():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(2)) * 3
    params = [SamplingParams(temperature=0.5, top_k=4, presence_penalty=1.0, logprobs=5),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams()]  # asks for none
    torch.manual_seed(0)
    out = Sampler().sample(logits, params, [[1, 2], [], []], [None] * 3)
    raw = logits.log_softmax(-1)
    for i, tok in enumerate(out.token_ids):
        assert abs(out.logprobs[i] - raw[i, tok].item()) < 1e-6
    vals, ids = raw[0].topk(5)
    assert [t for t, _ in out.top_logprobs[0]] == ids.tolist()
    assert max(abs(a - b) for (_, a), b in zip(out.top_logprobs[0], vals.tolist())) < 1e-6
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] == []


@pytest.mark.parametrize("field,value,words", [
    ("temperature", -0.1, ">= 0"), ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("top_k", -2, "-1 or 0"),
    ("min_p", 1.5, "[0, 1]"), ("max_tokens", 0, ">= 1"), ("n", 0, ">= 1"), ("logprobs", 21, "0..20"),
    ("presence_penalty", 3.0, "[-2, 2]"), ("frequency_penalty", -2.5, "[-2, 2]"),
    ("repetition_penalty", 0.0, "> 0"), ("stop", [""], "non-empty"), ("stop_token_ids", [-1], ">= 0"),
    ("seed", 1.5, "integer"),
])
def test_validate_names_the_field_and_the_range(field, value, words):
    with pytest.raises(ValueError, match=field) as err:
        SamplingParams(**{field: value})
    assert words in str(err.value)
    p = SamplingParams()
    setattr(p, field, value)  # changed after construction: validate() catches it too
    with pytest.raises(ValueError, match=field):
        p.validate()
