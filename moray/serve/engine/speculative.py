"""Speculative decoding: the rejection rule that verifies drafts, an n-gram drafter, metrics.

A drafter proposes k tokens; the target scores all of them in one pass, giving k + 1
next-token distributions p_0..p_k (one per draft position, plus the one after the last
draft). The rule of Leviathan et al. 2023 / Chen et al. 2023 then emits 1 to k + 1
tokens whose distribution is exactly the target's, whatever the drafter proposed:

    for i in 0..k-1:  accept x_i with probability min(1, p_i(x_i) / q_i(x_i))
                      at the first rejection emit y ~ norm(max(p_i - q_i, 0)) and stop
    all accepted:     emit a bonus token y ~ p_k

A deterministic drafter (n-grams, a greedy draft model) has q_i one-hot at x_i, so it
is accepted with probability p_i(x_i) and a rejection resamples p_i with x_i removed.
At temperature 0 (p_i one-hot at the target's argmax) the rule reduces to "accept while
the draft equals the argmax, then emit the target's own token": speculative greedy
equals plain greedy.

Leniency (`serve.speculative.acceptance`, off by default) accepts more drafts than the
exact rule: with c = 1 + leniency, accept with min(1, c * p / q) and resample the same
residual. This is the "lenience" of Leviathan et al. (their l = 1 / c): faster, but the
output is no longer the target's distribution. What one emits is, in closed form
(`lenient_distribution`),

    emitted(y) = min(q(y), c p(y)) + (1 - sum_x min(q(x), c p(x))) * max(p(y) - q(y), 0) / Z

which is p at c = 1 and drifts towards q as c grows; `measure_emitted` measures it by
Monte Carlo and `total_variation` states the cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

_MEASURE_FLOATS = 1 << 24  # measure_emitted's working set per call (64 MiB of float32)

# ---------------------------------------------------------------- the rejection rule


def rejection_sample_batch(draft_token_ids: torch.Tensor, draft_probs: Optional[torch.Tensor],
                           target_probs: torch.Tensor, generator: Optional[torch.Generator] = None,
                           leniency: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Verify N sequences' drafts at once (N = sequences, k = drafts each, V = vocabulary).

    draft_token_ids (N, k) long; draft_probs (N, k, V), or None for a deterministic drafter;
    target_probs (N, k + 1, V). Returns (tokens (N, k + 1) long, padded with -1 after the
    emitted ones; num_emitted (N,) long, 1..k + 1).
    """
    if leniency < 0:
        raise ValueError(f"leniency must be >= 0 (got {leniency}); 0 is the exact rule")
    N, k = draft_token_ids.shape
    V = target_probs.shape[-1]
    if target_probs.shape != (N, k + 1, V):
        raise ValueError(f"target_probs has shape {tuple(target_probs.shape)}; with {N} sequences of {k} drafts "
                         f"it must be ({N}, {k + 1}, V): one distribution per draft plus the bonus position")
    if draft_probs is not None and draft_probs.shape != (N, k, V):
        raise ValueError(f"draft_probs has shape {tuple(draft_probs.shape)}, expected ({N}, {k}, {V})")
    device = target_probs.device
    drafts = draft_token_ids.to(device=device, dtype=torch.long)
    p = target_probs.float()
    if draft_probs is None:  # one-hot at the draft: q(x_i) = 1
        q = torch.zeros_like(p[:, :k]).scatter_(-1, drafts[..., None], 1.0)  # (N, k, V)
    else:
        q = draft_probs.to(device).float()
    q = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)  # (N, k + 1, V): q = 0 at the bonus position

    p_x = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # (N, k)
    q_x = q[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    # A draft its drafter gave probability 0 (it cannot have sampled it) counts as q = tiny.
    accept_prob = ((1.0 + leniency) * p_x / q_x.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    u = torch.rand((N, k), generator=generator, device=device)
    accepted = (u < accept_prob).long().cumprod(dim=1)  # 1 up to the first rejection, 0 after
    n_accepted = accepted.sum(dim=1)  # (N,) in 0..k

    # The next token comes from the first rejected position (or the bonus position k).
    rows = torch.arange(N, device=device)
    p_j, q_j = p[rows, n_accepted], q[rows, n_accepted]  # (N, V)
    residual = (p_j - q_j).clamp_min(0.0)
    # An empty residual means p == q there, where the exact rule never rejects: only
    # rounding (or leniency) gets here, and p itself is then the right distribution.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, p_j, residual)
    next_token = torch.multinomial(residual, 1, generator=generator).squeeze(-1)  # (N,)

    positions = torch.arange(k + 1, device=device)
    tokens = torch.full((N, k + 1), -1, dtype=torch.long, device=device)
    tokens[:, :k] = torch.where(positions[:k] < n_accepted[:, None], drafts, -1)
    tokens[rows, n_accepted] = next_token
    return tokens, n_accepted + 1


def rejection_sample(draft_token_ids: Sequence[int], draft_probs: Optional[torch.Tensor],
                     target_probs: torch.Tensor, generator: Optional[torch.Generator] = None,
                     leniency: float = 0.0) -> List[int]:
    """One sequence: draft_token_ids (k), draft_probs (k, V) or None (deterministic drafter),
    target_probs (k + 1, V) -> the emitted tokens (1 to k + 1 of them)."""
    drafts = torch.tensor(list(draft_token_ids), dtype=torch.long).view(1, -1)
    tokens, n = rejection_sample_batch(drafts, None if draft_probs is None else draft_probs[None],
                                       target_probs[None], generator, leniency)
    return tokens[0, : int(n[0])].tolist()


# ---------------------------------------------------------------- what leniency costs


def total_variation(p_emitted: torch.Tensor, p_target: torch.Tensor) -> float:
    """0.5 * sum |p_emitted - p_target| over the last dim, averaged over any leading dims."""
    return float(0.5 * (p_emitted.double() - p_target.double()).abs().sum(-1).mean())


def lenient_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor, leniency: float) -> torch.Tensor:
    """The closed form of what one verified draft emits under `leniency` (see the module doc);
    target_probs and draft_probs (..., V). Equals target_probs at leniency 0."""
    p, q = target_probs.double(), draft_probs.double()
    accepted = torch.minimum(q, (1.0 + leniency) * p)  # (..., V) draft y proposed and accepted
    residual = (p - q).clamp_min(0.0)
    z = residual.sum(-1, keepdim=True)
    residual = torch.where(z > 0, residual / z.clamp_min(1e-300), p)
    return accepted + (1.0 - accepted.sum(-1, keepdim=True)) * residual


@dataclass
class EmittedDistribution:
    """A Monte Carlo measurement of the first token one verification step emits."""

    probs: torch.Tensor  # (..., V) frequencies, the shape of the target given
    acceptance_rate: float  # share of drafts accepted
    samples: int  # draws per distribution

    def total_variation(self, target_probs: torch.Tensor) -> float:
        return total_variation(self.probs, target_probs)


def measure_emitted(target_probs: torch.Tensor, draft_probs: torch.Tensor, samples: int = 20_000,
                    leniency: float = 0.0, generator: Optional[torch.Generator] = None) -> EmittedDistribution:
    """Draw `samples` drafts x ~ q for each (p, q) pair (shapes (V,) or (M, V)), verify each with
    k = 1, and count the first emitted token: the next-token distribution speculative decoding
    really produces, to set against p with `total_variation`."""
    p = target_probs.float().reshape(-1, target_probs.shape[-1])  # (M, V)
    q = draft_probs.float().reshape(p.shape)
    M, V = p.shape
    chunk = max(1, min(samples, _MEASURE_FLOATS // (3 * V)))  # rows per call: bounded memory at any V
    counts = torch.zeros(M, V, dtype=torch.float64, device=p.device)
    accepted = 0
    for m in range(M):
        for start in range(0, samples, chunk):
            rows = min(chunk, samples - start)
            drafts = torch.multinomial(q[m], rows, replacement=True, generator=generator)  # (rows,)
            tokens, n = rejection_sample_batch(drafts[:, None], q[m].expand(rows, 1, V),
                                               p[m].expand(rows, 2, V),  # the bonus position goes unused
                                               generator, leniency)
            counts[m].index_add_(0, tokens[:, 0], torch.ones(rows, dtype=torch.float64, device=p.device))
            accepted += int((n > 1).sum())
    return EmittedDistribution((counts / samples).float().reshape(target_probs.shape), accepted / (M * samples),
                               samples)


# ---------------------------------------------------------------- drafting from n-grams


class NgramDrafter:
    """Prompt lookup decoding: the sequence so far predicts itself.

    Finds the most recent earlier occurrence of the sequence's last n tokens (the longest
    n from max_n down to min_n that occurs) and proposes the up to k tokens that followed
    it. Costs no model, and pays off where outputs copy their input (code edits,
    summaries, retrieval answers, repetitive text).
    """

    def __init__(self, min_n: int = 2, max_n: int = 4, k: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"NgramDrafter needs 1 <= min_n <= max_n (got min_n {min_n}, max_n {max_n})")
        if k < 1:
            raise ValueError(f"NgramDrafter needs k >= 1 drafts (got {k})")
        self.min_n, self.max_n, self.k = min_n, max_n, k

    def propose(self, token_ids: Sequence[int]) -> List[int]:
        """token_ids: prompt + output so far -> up to k drafts ([] when no n-gram recurs)."""
        tokens = list(token_ids)
        L = len(tokens)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            suffix = tokens[L - n:]
            first = suffix[0]
            for start in range(L - n - 1, -1, -1):  # most recent first; the suffix itself excluded
                if tokens[start] == first and tokens[start:start + n] == suffix:
                    return tokens[start + n:start + n + self.k]
        return []


# ---------------------------------------------------------------- metrics


@dataclass
class SpecStats:
    """Counts over verification steps (one step = one sequence's drafts checked by one target pass)."""

    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, accepted
    emitted: int = 0  # tokens emitted (accepted + one replacement or bonus per step)
    steps: int = 0

    def record(self, drafted: int, emitted: int) -> None:
        """One step that checked `drafted` drafts and emitted `emitted` tokens (1..drafted + 1)."""
        if not 1 <= emitted <= drafted + 1:
            raise ValueError(f"a step with {drafted} drafts emits 1 to {drafted + 1} tokens, not {emitted}")
        self.drafted += drafted
        self.accepted += emitted - 1
        self.emitted += emitted
        self.steps += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted (0 before any draft)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Drafts accepted per step; each step also emits one token of the target's own, so
        tokens per target pass is this + 1."""
        return self.accepted / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted, "steps": self.steps,
                "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length}


__all__ = ["rejection_sample", "rejection_sample_batch", "total_variation", "lenient_distribution",
           "EmittedDistribution", "measure_emitted", "NgramDrafter", "SpecStats"]
