"""SamplingParams (vLLM's names and defaults) and the sampler.

    sampler = Sampler()
    out = sampler.sample(logits, params, output_token_ids, generators)
    out.token_ids  # one token per row

The order is vLLM's: penalties -> temperature -> min_p -> top_k -> top_p ->
sample. Work is batched over rows grouped by what they need (greedy rows take
an argmax; the rest share one pass of each filter, a row that switches a filter
off gets the no-op value); nothing loops over the vocabulary.

Sampling draws exponentials q and takes argmax(p / q) (an exact draw from p,
vLLM's trick). A seeded request draws its q from its own torch.Generator, one
vocabulary-sized draw per step, so its tokens do not depend on which batch it
lands in; unseeded rows share one draw from the global generator.

Logprobs follow vLLM's default (logprobs_mode "raw_logprobs"): the log-softmax
of the model's raw logits, before penalties, temperature and filters; the
sampled token's logprob and the top-n are both read from it.

Stop strings, stop token ids, max_tokens and ignore_eos are the engine's
business (they end a sequence); the sampler only carries them in the params.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

_GREEDY_EPS = 1e-5  # vLLM: a temperature below this is greedy
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


@dataclass
class SamplingParams:
    n: int = 1  # sequences returned per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    seed: Optional[int] = None  # per-request generator: the same tokens in any batch
    stop: Union[None, str, List[str]] = None  # strings that end the output (not included)
    stop_token_ids: Optional[List[int]] = None  # tokens that end the output
    max_tokens: int = 16
    logprobs: Optional[int] = None  # top logprobs per token (0 = only the sampled token's)
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence
    repetition_penalty: float = 1.0  # CTRL / HF: divide positive, multiply negative logits of seen tokens
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and its allowed range (called on construction too)."""
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed} (got {getattr(self, name)!r})")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", ">= 0 (0 = greedy)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "-1 or 0 (off) or an integer >= 1")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an integer or None")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"None or an integer in 0..{MAX_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0 (1 = off)")
        if self.stop is not None and not (isinstance(self.stop, list) and all(isinstance(s, str) and s
                                                                            for s in self.stop)):
            raise bad("stop", "None, a non-empty string or a list of non-empty strings")
        if self.stop_token_ids is not None and not (isinstance(self.stop_token_ids, list) and all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids)):
            raise bad("stop_token_ids", "None or a list of token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplerOutput:
    token_ids: List[int]
    # Raw-distribution logprob of each row's sampled token; None when no row asked for logprobs.
    logprobs: Optional[List[float]]
    # Per row, the params.logprobs most likely (token, raw logprob), best first ([] for rows that did
    # not ask, or asked for 0); None when no row asked.
    top_logprobs: Optional[List[List[Tuple[int, float]]]]


# ---------------------------------------------------------------- the logits processors


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], output_token_ids: Sequence[List[int]],
                    prompt_token_ids: Optional[Sequence[List[int]]] = None) -> torch.Tensor:
    """Rows (S, V) -> penalised rows. OpenAI: logit[j] -= c[j] * frequency + (c[j] > 0) * presence, c the
    counts in the output so far; repetition (vLLM): over prompt and output tokens, positive logits
    divided by it and negative ones multiplied."""
    S, V = logits.shape
    dev = logits.device
    counts = _counts(output_token_ids, S, V, dev)  # (S, V)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev, dtype=logits.dtype)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=dev, dtype=logits.dtype)[:, None]
    out = logits - counts * freq - (counts > 0).to(logits.dtype) * pres
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev, dtype=logits.dtype)[:, None]
    if bool((rep != 1).any()):
        seen = counts > 0
        if prompt_token_ids is not None:
            seen |= _counts(prompt_token_ids, S, V, dev) > 0
        scaled = torch.where(out > 0, out / rep, out * rep)
        out = torch.where(seen, scaled, out)
    return out


def _counts(token_lists: Sequence[List[int]], S: int, V: int, device) -> torch.Tensor:
    """(S, V) float occurrence counts; lists padded with the index V, a column dropped after."""
    width = max([len(t) for t in token_lists] + [1])
    idx = torch.tensor([list(t) + [V] * (width - len(t)) for t in token_lists], device=device).view(S, width)
    return torch.zeros(S, V + 1, device=device).scatter_add_(1, idx, torch.ones(idx.shape, device=device))[:, :V]


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits (S, V), min_p (S,): drop tokens whose probability is below min_p x the row's top."""
    probs = logits.softmax(-1)
    keep = probs >= min_p[:, None] * probs.max(-1, keepdim=True).values
    return logits.masked_fill(~keep, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits (S, V); top_k (S,) with V = off; top_p (S,) with 1 = off. One sort serves both.

    top-k keeps exactly k tokens (ties broken by the sort); top-p then keeps the smallest prefix of
    what remains whose probability reaches p (the top token always stays).
    """
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(-1, descending=True)  # (S, V)
    rank = torch.arange(V, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability of the better tokens
    # Rows at p = 1 are left alone: rounding can push `before` of the last tokens to 1.
    sorted_logits = sorted_logits.masked_fill((before >= top_p[:, None]) & (top_p[:, None] < 1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def processed_probs(logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[List[int]],
                    prompts: Optional[Sequence[List[int]]] = None) -> torch.Tensor:
    """What the sampler draws from, as probabilities: logits (R, V) -> (R, V).

    The Sampler's order (penalties over `histories`, the output tokens before each row ->
    temperature -> min_p -> top_k / top_p -> softmax); a greedy row is one-hot at the argmax
    of its penalised logits, which is the token the sampler would pick.
    """
    x = logits.float()
    R, V = x.shape
    dev = x.device
    pen = [i for i, p in enumerate(params) if p.has_penalties]
    if pen:
        idx = torch.tensor(pen, device=dev)
        x = x.index_copy(0, idx, apply_penalties(x[idx], [params[i] for i in pen], [histories[i] for i in pen],
                                                 [prompts[i] for i in pen] if prompts is not None else None))
    probs = torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)  # greedy rows
    rand = [i for i, p in enumerate(params) if not p.greedy]
    if rand:
        idx = torch.tensor(rand, device=dev)
        rp = [params[i] for i in rand]
        y = x[idx] / torch.tensor([p.temperature for p in rp], device=dev)[:, None]
        if any(p.min_p > 0 for p in rp):
            y = apply_min_p(y, torch.tensor([p.min_p for p in rp], device=dev))
        if any(p.top_k > 0 or p.top_p < 1 for p in rp):
            k = torch.tensor([p.top_k if p.top_k > 0 else V for p in rp], device=dev)
            y = apply_top_k_top_p(y, k, torch.tensor([p.top_p for p in rp], device=dev))
        probs = probs.index_copy(0, idx, y.softmax(-1))
    return probs


# ---------------------------------------------------------------- the sampler


class Sampler:
    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams], output_token_ids: Sequence[List[int]],
               generators: Sequence[Optional[torch.Generator]],
               prompt_token_ids: Optional[Sequence[List[int]]] = None) -> SamplerOutput:
        """logits (S, V) -> one token per row. prompt_token_ids only feed repetition_penalty."""
        S, V = logits.shape
        if not (len(params) == len(output_token_ids) == len(generators) == S):
            raise ValueError(f"{S} logit rows but {len(params)} params, {len(output_token_ids)} output lists and "
                             f"{len(generators)} generators; give one of each per row")
        logits = logits.float()
        dev = logits.device
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = logits.log_softmax(-1) if want_logprobs else None

        # The distribution each row draws from (greedy rows: one-hot at their argmax); the
        # speculative verifier uses the same function, so both sample from one definition.
        probs = processed_probs(logits, params, output_token_ids, prompt_token_ids)
        tokens = probs.argmax(-1)
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if rand:
            idx = torch.tensor(rand, device=dev)
            q = self._exponentials(len(rand), V, [generators[i] for i in rand], dev)
            tokens = tokens.index_copy(0, idx, (probs[idx] / q).argmax(-1))

        token_list = tokens.tolist()
        if not want_logprobs:
            return SamplerOutput(token_list, None, None)
        chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        n_top = max(p.logprobs or 0 for p in params)
        top = [[] for _ in range(S)]
        if n_top:
            vals, ids = raw_logprobs.topk(min(n_top, V), dim=-1)
            vals, ids = vals.tolist(), ids.tolist()
            for i, p in enumerate(params):
                k = p.logprobs or 0
                top[i] = list(zip(ids[i][:k], vals[i][:k]))
        return SamplerOutput(token_list, chosen, top)

    @staticmethod
    def _exponentials(rows: int, V: int, generators: Sequence[Optional[torch.Generator]], device) -> torch.Tensor:
        """(rows, V) Exp(1) draws: unseeded rows in one call, a seeded row from its own generator
        (on the generator's device, so a CPU generator works for a GPU batch)."""
        q = torch.empty(rows, V, device=device).exponential_()
        for i, g in enumerate(generators):
            if g is not None:
                q[i] = torch.empty(V, device=g.device).exponential_(generator=g).to(device)
        return q.clamp_(min=torch.finfo(q.dtype).tiny)  # an exact 0 would divide into inf or nan
