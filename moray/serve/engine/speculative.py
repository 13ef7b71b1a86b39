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

In the engine (core.py): each step a drafter (`NgramDrafter`, or `DraftModelDrafter`:
a small model with its own paged KV cache, kept in step with the target) proposes up to
k tokens for every decoding request; the target scores them in one pass; `verify`
turns the target's logits into the request's sampling distribution (`processed_probs`:
the sampler's penalties, temperature, min-p, top-k, top-p) and applies the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from moray.serve.engine.executor import ModelExecutor, SeqChunk
from moray.serve.engine.kv_cache import KVCacheManager
from moray.serve.engine.request import Request
from moray.serve.engine.sampling import processed_probs

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
                    return self._continue(tokens, start + n)
        return []

    def _continue(self, tokens: List[int], at: int) -> List[int]:
        """k tokens from `at`; a match close to the end (inside a run such as "____") has fewer
        than k after it, so the repeat it found goes on with its period (L - at), as it would
        if the text keeps repeating, instead of proposing one or two tokens."""
        period, out = len(tokens) - at, []
        for i in range(self.k):
            out.append(tokens[at + i] if at + i < len(tokens) else out[i - period])
        return out


# ---------------------------------------------------------------- the engine's side


def draft_histories(output_token_ids: List[int], drafts: List[int]) -> List[List[int]]:
    """The output before each of the k + 1 verified positions: output, output + x_1, ..."""
    return [output_token_ids + drafts[:i] for i in range(len(drafts) + 1)]


def verify(target_probs: Sequence[torch.Tensor], drafts: Sequence[List[int]],
           draft_probs: Sequence[Optional[torch.Tensor]], greedy: Sequence[bool],
           generators: Sequence[Optional[torch.Generator]], leniency: float = 0.0) -> List[List[int]]:
    """Per sequence: target_probs (k + 1, V) from processed_probs, its k drafts, their draft
    probabilities (k, V) or None (a deterministic drafter) -> the emitted tokens (1..k + 1).

    A greedy sequence accepts while the draft is the target's argmax, then takes the
    target's own token (no randomness). The rest go through rejection_sample_batch, one
    call per group of equal k and drafter kind; a seeded sequence alone, on its own
    generator (on the CPU, where the engine keeps it), so its tokens do not depend on
    the batch.
    """
    out: List[Optional[List[int]]] = [None] * len(drafts)
    groups: Dict[tuple, List[int]] = {}
    for i, (p, d) in enumerate(zip(target_probs, drafts)):
        if greedy[i]:
            t = p.argmax(-1).tolist()
            a = 0
            while a < len(d) and d[a] == t[a]:
                a += 1
            out[i] = list(d[:a]) + [t[a]]
        else:
            key = (len(d), draft_probs[i] is None, i if generators[i] is not None else -1)
            groups.setdefault(key, []).append(i)
    for (k, deterministic, _), rows in groups.items():
        gen = generators[rows[0]]
        dev = torch.device("cpu") if gen is not None else target_probs[rows[0]].device
        p = torch.stack([target_probs[i] for i in rows]).to(dev)  # (N, k + 1, V)
        q = None if deterministic else torch.stack([draft_probs[i] for i in rows]).to(dev)
        x = torch.tensor([list(drafts[i]) for i in rows], dtype=torch.long, device=dev).view(len(rows), k)
        tokens, n = rejection_sample_batch(x, q, p, gen, leniency)
        for j, i in enumerate(rows):
            out[i] = tokens[j, : int(n[j])].tolist()
    return out  # type: ignore[return-value]


class DraftModelDrafter:
    """A small model with the target's vocabulary drafts k tokens per sequence, greedily for
    greedy requests, else by sampling its own processed distribution (which it returns as q).

    It keeps its own paged KV cache (its ModelExecutor and KVCacheManager, prefix caching
    on), one shadow sequence per target request sharing the target's token lists. A
    proposal first catches the draft up on the tokens it has not computed (the whole prompt
    the first time: its prefill, in one chunk; later the one or two tokens the last
    verification emitted), then decodes k - 1 more. `commit` rolls the draft back to what
    the target accepted: its computed tokens end after the last accepted draft it holds
    KV for, and the rest of its slots are overwritten next time.
    """

    def __init__(self, model, num_blocks: int, block_size: int, k: int, dtype=None, device=None,
                 enable_prefix_caching: bool = True):
        self.k = k
        self.executor = ModelExecutor(model, num_blocks, block_size, dtype=dtype, device=device)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        self.max_len = model.rope_cos.shape[0]
        self._seqs: Dict[str, Request] = {}  # target request id -> the draft's shadow sequence
        self.seconds = 0.0  # time spent in the draft model's forwards

    def propose(self, requests: Sequence[Request], ks: Sequence[int],
                generators: Sequence[Optional[torch.Generator]]) -> List[Tuple[List[int], Optional[torch.Tensor]]]:
        """Up to ks[i] drafts for each request (fewer, or none, where the draft's cache or context
        has no room) and their probabilities (k_i, V), or None for a greedy request."""
        out: List[Tuple[List[int], Optional[torch.Tensor]]] = [([], None)] * len(requests)
        live, chunks = [], []  # (index, shadow, k, n)
        for i, (req, k) in enumerate(zip(requests, ks)):
            n = req.num_tokens
            k = min(k, self.max_len - n + 1)  # the last draft is fed at position n + k - 2
            if k < 1:
                continue
            seq = self._seqs.get(req.request_id)
            if seq is None:
                seq = Request(req.request_id, req.prompt_token_ids, req.sampling_params,
                              output_token_ids=req.output_token_ids)  # the same lists: it sees every new token
                hit_blocks, hits = self.kv.get_computed_blocks(seq)
                if self.kv.allocate_slots(seq, n - hits + k - 1, hit_blocks) is None:
                    continue
                seq.num_computed_tokens = hits
                self._seqs[req.request_id] = seq
            else:
                seq.num_computed_tokens = min(seq.num_computed_tokens, n - 1)  # the last token is fed again
                if self.kv.allocate_slots(seq, n - seq.num_computed_tokens + k - 1) is None:
                    continue
            c = seq.num_computed_tokens
            live.append((i, seq, k, n))
            chunks.append(SeqChunk(seq.token_ids_slice(c, n), c, self.kv.block_table(seq.request_id), True))
        if not live:
            return out
        drafts: List[List[int]] = [[] for _ in live]
        probs: List[List[torch.Tensor]] = [[] for _ in live]
        active = list(range(len(live)))
        for step in range(max(k for _, _, k, _ in live)):
            res = self.executor.execute(chunks)
            self.seconds += res.seconds
            reqs = [live[j][1] for j in active]
            q = processed_probs(res.logits, [r.sampling_params for r in reqs],
                                [r.output_token_ids + drafts[j] for r, j in zip(reqs, active)])
            for row, j in enumerate(active):
                g = generators[live[j][0]]
                if reqs[row].sampling_params.greedy:
                    tok = int(q[row].argmax())
                else:
                    qr = q[row].cpu() if g is not None else q[row]
                    tok = int(torch.multinomial(qr, 1, generator=g))
                    probs[j].append(q[row])
                drafts[j].append(tok)
            active = [j for j in active if len(drafts[j]) < live[j][2]]
            chunks = [SeqChunk([drafts[j][-1]], live[j][3] + len(drafts[j]) - 1,
                               self.kv.block_table(live[j][1].request_id), True) for j in active]
            if not active:
                break
        for j, (i, seq, k, n) in enumerate(live):
            seq.num_computed_tokens = n  # verified; the drafts' KV sits past it until commit
            self.kv.cache_full_blocks(seq)
            out[i] = (drafts[j], torch.stack(probs[j]) if probs[j] else None)
        return out

    def commit(self, request_id: str, num_tokens_proposed_at: int, num_drafts: int, num_accepted: int) -> None:
        """After verification: the draft holds KV for its first num_drafts - 1 drafts past
        num_tokens_proposed_at; of those, the accepted ones are now the target's tokens too."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return
        seq.num_computed_tokens = min(num_tokens_proposed_at + min(num_accepted, num_drafts - 1), seq.num_tokens - 1)
        self.kv.cache_full_blocks(seq)

    def free(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.kv.free(seq)

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)


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
           "EmittedDistribution", "measure_emitted", "NgramDrafter", "DraftModelDrafter", "processed_probs",
           "draft_histories", "verify", "SpecStats"]
