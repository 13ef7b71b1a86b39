"""Speculative decoding's math: the rejection rule keeps the target's distribution exactly
(a chi-square test cannot tell them apart, and catches the rule broken on purpose), greedy
verification is plain greedy, leniency's cost is measured, and the n-gram drafter."""

from __future__ import annotations

import pytest
import torch

from moray.serve.engine.speculative import (NgramDrafter, SpecStats, lenient_distribution, measure_emitted,
                                            rejection_sample, rejection_sample_batch, total_variation)

V = 8
DRAWS = 20_000


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed counts against probabilities (cells expected empty dropped)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    keep = probs > 0
    if bool((counts[~keep] > 0).any()):
        return 0.0  # a token the target never emits
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    df = torch.tensor(float(int(keep.sum()) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))  # the chi-square survival function


def dist(seed: int, *shape: int, sharp: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(*shape, V, generator=g, dtype=torch.float64), -1).float()


def counts_of(tokens: torch.Tensor, n: int = V) -> torch.Tensor:
    return torch.bincount(tokens.flatten(), minlength=n).double()


def first_tokens(p: torch.Tensor, q: torch.Tensor, seed: int, rule=rejection_sample_batch) -> torch.Tensor:
    """DRAWS one-draft steps with x ~ q against p: the first emitted token of each."""
    g = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q, DRAWS, replacement=True, generator=g)[:, None]
    tokens, _ = rule(drafts, q.expand(DRAWS, 1, V), p.expand(DRAWS, 2, V), g)
    return tokens[:, 0]


# ---------------------------------------------------------------- the rule broken on purpose


def always_accept(drafts, q, p, g):
    """Broken: every draft passes, so the output follows the drafter."""
    N, k = drafts.shape
    bonus = torch.multinomial(p[:, k], 1, generator=g)
    return torch.cat([drafts, bonus], 1), torch.full((N,), k + 1)


def resample_from_p(drafts, q, p, g):
    """Broken: min(1, p/q) acceptance, but a rejection resamples p instead of max(p - q, 0)."""
    x = drafts[:, 0]
    px, qx = p[:, 0].gather(1, x[:, None])[:, 0], q[:, 0].gather(1, x[:, None])[:, 0]
    accept = torch.rand(len(x), generator=g) < (px / qx).clamp(max=1)
    resampled = torch.multinomial(p[:, 0], 1, generator=g)[:, 0]
    return torch.where(accept, x, resampled)[:, None], 1 + accept.long()


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("seed", [0, 1])
def test_first_token_follows_the_target_and_broken_rules_are_caught(seed):
    p, q = dist(10 + seed), dist(20 + seed)
    assert total_variation(q, p) > 0.2  # a drafter that disagrees, so breaking the rule shows
    pv = chi_square_pvalue(counts_of(first_tokens(p, q, seed)), p)
    pv_accept = chi_square_pvalue(counts_of(first_tokens(p, q, seed, always_accept)), p)
    pv_from_p = chi_square_pvalue(counts_of(first_tokens(p, q, seed, resample_from_p)), p)
    print(f"seed {seed}: p-value exact {pv:.3f}, always-accept {pv_accept:.1e}, resample-from-p {pv_from_p:.1e}")
    assert pv > 0.01
    assert pv_accept < 1e-6 and pv_from_p < 1e-6


def test_second_token_given_the_first_accepted_follows_the_target():
    # Context-dependent "models": p1[a], q1[a] are the distributions after first token a.
    p0, q0, p1, q1, p2 = dist(30), dist(31), dist(32, V), dist(33, V), dist(34, V, V)
    g = torch.Generator().manual_seed(3)
    x0 = torch.multinomial(q0, DRAWS, replacement=True, generator=g)  # (S,)
    x1 = torch.multinomial(q1[x0], 1, generator=g)[:, 0]
    drafts = torch.stack([x0, x1], 1)
    draft_probs = torch.stack([q0.expand(DRAWS, V), q1[x0]], 1)  # (S, 2, V)
    target = torch.stack([p0.expand(DRAWS, V), p1[x0], p2[x0, x1]], 1)  # (S, 3, V)
    tokens, n = rejection_sample_batch(drafts, draft_probs, target, g)
    first_accepted = n >= 2
    observed = torch.zeros(V, V, dtype=torch.float64)  # (first, second) among first-accepted steps
    observed.index_put_((tokens[first_accepted, 0], tokens[first_accepted, 1]),
                        torch.ones(int(first_accepted.sum()), dtype=torch.float64), accumulate=True)
    pvalues = [chi_square_pvalue(observed[a], p1[a]) for a in range(V) if observed[a].sum() >= 500]
    print(f"second-token p-values: {[round(v, 3) for v in pvalues]}")
    assert len(pvalues) >= 3 and min(pvalues) > 0.01 / len(pvalues)  # Bonferroni over the contexts tested
    # The first token over all steps is still p0's.
    assert chi_square_pvalue(counts_of(tokens[:, 0]), p0) > 0.01


def test_a_deterministic_drafter_and_an_empty_draft_keep_the_target():
    p = dist(40)
    g = torch.Generator().manual_seed(4)
    drafts = torch.full((DRAWS, 1), 5)  # q one-hot at token 5
    tokens, _ = rejection_sample_batch(drafts, None, p.expand(DRAWS, 2, V), g)
    assert chi_square_pvalue(counts_of(tokens[:, 0]), p) > 0.01
    none, n = rejection_sample_batch(torch.zeros(DRAWS, 0, dtype=torch.long), None, p.expand(DRAWS, 1, V), g)
    assert bool((n == 1).all()) and chi_square_pvalue(counts_of(none[:, 0]), p) > 0.01
    assert len(rejection_sample([], None, p[None], g)) == 1


def test_greedy_verification_is_plain_greedy():
    # A target "model": logits by the last two tokens; greedy = one-hot at the argmax.
    g = torch.Generator().manual_seed(5)
    table = torch.randn(V, V, V, generator=g)

    def greedy_probs(context):
        return torch.nn.functional.one_hot(table[context[-2], context[-1]].argmax(), V).float()

    prompt, new = [1, 2], 60
    plain = list(prompt)
    while len(plain) < len(prompt) + new:
        plain.append(int(greedy_probs(plain).argmax()))
    for stochastic_drafter in (False, True):
        seq, stats = list(prompt), SpecStats()
        while len(seq) < len(prompt) + new:
            k = int(torch.randint(1, 6, (), generator=g))
            # Drafts: the right continuation with random corruptions, so both branches run.
            drafts, ctx = [], list(seq)
            for _ in range(k):
                right = int(greedy_probs(ctx).argmax())
                drafts.append(right if torch.rand((), generator=g) < 0.7 else int(torch.randint(V, (), generator=g)))
                ctx.append(drafts[-1])
            target = torch.stack([greedy_probs(seq + drafts[:i]) for i in range(k + 1)])
            q = dist(int(torch.randint(1000, (), generator=g)), k) if stochastic_drafter else None
            out = rejection_sample(drafts, q, target, g)
            stats.record(k, len(out))
            seq += out
        assert seq[:len(prompt) + new] == plain
        assert 0 < stats.acceptance_rate < 1 and stats.emitted == len(seq) - len(prompt)


def test_batch_shapes_and_padding():
    p, q = dist(50, 3, 4), dist(51, 3, 3)
    tokens, n = rejection_sample_batch(torch.randint(V, (3, 3)), q, p, torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 4) and bool(((n >= 1) & (n <= 4)).all())
    for row, count in zip(tokens.tolist(), n.tolist()):
        assert all(t >= 0 for t in row[:count]) and all(t == -1 for t in row[count:])
    with pytest.raises(ValueError, match=r"must be \(3, 4, V\)"):
        rejection_sample_batch(torch.randint(V, (3, 3)), q, p[:, :3])
    with pytest.raises(ValueError, match="leniency"):
        rejection_sample_batch(torch.randint(V, (3, 3)), q, p, leniency=-1)


# ---------------------------------------------------------------- leniency


def test_leniency_costs_grow_with_the_knob_and_are_measured():
    p, q = dist(60, 4), dist(61, 4)  # four contexts
    g = torch.Generator().manual_seed(6)
    rows = []
    for leniency in (0.0, 0.5, 1.0, 2.0):
        m = measure_emitted(p, q, samples=DRAWS, leniency=leniency, generator=g)
        exact = total_variation(lenient_distribution(p, q, leniency), p)
        rows.append((leniency, m.total_variation(p), exact, m.acceptance_rate))
        # The Monte Carlo measurement agrees with the closed form.
        assert m.total_variation(lenient_distribution(p, q, leniency)) < 0.02
    for r in rows:
        print("leniency %.1f: TV measured %.4f, closed form %.4f, acceptance %.3f" % r)
    assert rows[0][2] < 1e-6 and rows[0][1] < 0.02  # exact: only sampling noise (~sqrt(V / draws))
    tv, exact, acc = [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]
    assert all(a < b for a, b in zip(exact, exact[1:])) and all(a < b for a, b in zip(tv, tv[1:]))
    assert all(a < b for a, b in zip(acc, acc[1:]))
    assert abs(acc[0] - float(torch.minimum(p, q).sum(-1).mean())) < 0.01  # exact rule: sum_x min(p, q)


def test_total_variation():
    a, b = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.5])
    assert total_variation(a, a) == 0 and total_variation(a, b) == pytest.approx(0.5)


# ---------------------------------------------------------------- n-gram drafting


def test_ngram_drafter_proposes_the_continuation():
    d = NgramDrafter(min_n=2, max_n=4, k=3)
    assert d.propose([1, 2, 3, 4, 5, 9, 9, 1, 2, 3]) == [4, 5, 9]
    assert d.propose([1, 2, 3, 4, 1, 2, 3]) == [4, 1, 2]  # the continuation may run into the suffix
    assert d.propose([7, 8, 9, 7, 8]) == [9, 7, 8]


def test_ngram_drafter_without_a_match():
    d = NgramDrafter(min_n=2, max_n=3, k=4)
    assert d.propose([]) == [] and d.propose([5]) == [] and d.propose([1, 2, 3, 4, 5]) == []
    assert d.propose([1, 2, 1, 3]) == []  # only unigrams recur, and min_n is 2
    assert NgramDrafter(min_n=1, max_n=3, k=2).propose([1, 2, 1, 3, 1]) == [3, 1]


def test_ngram_drafter_prefers_the_longest_then_the_most_recent_match():
    d = NgramDrafter(min_n=2, max_n=4, k=2)
    # "2 3" last occurs before 7; "1 2 3" (longer) only before 5.
    assert d.propose([1, 2, 3, 5, 0, 2, 3, 7, 0, 1, 2, 3]) == [5, 0]
    # Two occurrences of the same 3-gram: the most recent wins.
    assert d.propose([4, 5, 6, 1, 4, 5, 6, 2, 4, 5, 6]) == [2, 4]
    with pytest.raises(ValueError, match="min_n"):
        NgramDrafter(min_n=3, max_n=2)


def test_spec_stats():
    s = SpecStats()
    s.record(4, 3)
    s.record(4, 5)
    s.record(2, 1)
    assert (s.drafted, s.accepted, s.emitted, s.steps) == (10, 6, 9, 3)
    assert s.acceptance_rate == pytest.approx(0.6) and s.mean_accepted_length == pytest.approx(2.0)
    with pytest.raises(ValueError, match="emits 1 to 3"):
        s.record(2, 4)


def test_ngram_drafts_verified_by_a_real_model_give_its_greedy_output():
    from moray.model import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, n_experts=4, max_seq_len=96,
                      init_std=0.5)  # a random model whose greedy output falls into a cycle after a while
    model = build_model(cfg, seed=1).eval()
    prompt, new = [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4], 40

    @torch.no_grad()
    def last_logits(seq, n):  # the model's next-token logits after each of the last n positions
        return model(torch.tensor([seq]))[0, -n:]

    plain = list(prompt)
    while len(plain) < len(prompt) + new:
        plain.append(int(last_logits(plain, 1)[-1].argmax()))
    drafter, seq, stats = NgramDrafter(min_n=2, max_n=3, k=4), list(prompt), SpecStats()
    while len(seq) < len(prompt) + new:
        drafts = drafter.propose(seq)
        greedy = torch.nn.functional.one_hot(last_logits(seq + drafts, len(drafts) + 1).argmax(-1), cfg.vocab_size)
        out = rejection_sample(drafts, None, greedy.float())
        stats.record(len(drafts), len(out))
        seq += out
    assert seq[:len(prompt) + new] == plain
    print(f"n-gram drafting on the tiny model: {stats.to_dict()}")
    assert stats.accepted > 0 and stats.drafted > stats.accepted  # both branches ran
    assert stats.steps < new  # fewer target passes than tokens


def test_ngram_inside_a_run_proposes_k_tokens_with_the_period():
    """The most recent match of a run is one token back; the repeat goes on with its period."""
    assert NgramDrafter(min_n=2, max_n=3, k=4).propose([5, 1, 1, 1, 1]) == [1, 1, 1, 1]
    assert NgramDrafter(min_n=2, max_n=2, k=5).propose([9, 7, 8, 7, 8, 7, 8]) == [7, 8, 7, 8, 7]
