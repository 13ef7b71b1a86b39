"""The resumable mixture sampler: what every data-parallel rank trains on next.

    sampler = MixtureSampler("data/demo", seed=1234, dp_rank=r, dp_size=R)
    x = sampler.next_batch(4)            # int64 [4, seq_len + 1]
    inputs, targets = x[:, :-1], x[:, 1:]
    state = sampler.state_dict()         # JSON-able, the same on every rank

The stream is global. Every rank walks the same deterministic order (seed,
manifest, mixture); a call to `next_batch(B)` on R ranks consumes the next
B * R sequences of it and rank r gets sequences [r*B, (r+1)*B) of those. So:
- all ranks must call `next_batch` with the same batch_size and seq_len;
- within a source's epoch no sequence is served twice across ranks, and every
  sequence is served once per epoch (sources repeat their own number of epochs
  per pass; then the next pass begins with fresh orders);
- the state is a position in the global order (pass, sequences taken per
  source), independent of dp_rank and dp_size: save it from any rank, load it
  under another layout or batch size and the stream goes on from the next
  unseen sequence.

Sequence length. Shards store rows of the prepared seq_len L0; any seq_len
can be read: each shard's packed stream is cut into windows of seq_len + 1
tokens (contiguous text, possibly crossing documents at EOS, never crossing
shards). Changing seq_len between calls (context extension) keeps each
source's fraction of the pass; the sequences before and after the change are
cut differently, so the change is exact in proportion, not per token.

Memory: shards are read lazily and kept in an LRU of `cache_shards` (default
(shuffle_window + 1) per source), verified by checksum on every load; index
arrays are O(number of shards). Nothing grows with the corpus beyond that.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Union

import numpy as np

from moray.data.manifest import DataError, Manifest
from moray.data.mixture import LRU, SourceOrder, interleave, pass_totals, rescale, salt, view_units

STATE_VERSION = 1


class MixtureSampler:
    def __init__(
        self,
        data: Union[str, Manifest],
        *,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seq_len: Optional[int] = None,
        tokenizer_id: Optional[str] = None,
        vocab_size: Optional[int] = None,
        mixture: Optional[Mapping[str, Mapping[str, Optional[float]]]] = None,
        shuffle_window: int = 4,
        cache_shards: Optional[int] = None,
    ) -> None:
        """data: a data dir holding manifest.json (or a loaded Manifest). tokenizer_id /
        vocab_size: checked against the manifest. mixture: {source: {"epochs": e} or
        {"weight": w}} overriding what the manifest recorded at preparation."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside dp_size {dp_size}")
        self.manifest = data if isinstance(data, Manifest) else Manifest.load(data)
        if tokenizer_id is not None:
            self.manifest.check_tokenizer(tokenizer_id)
        if vocab_size is not None:
            self.manifest.check_vocab(vocab_size)
        self.seed, self.dp_rank, self.dp_size = int(seed), dp_rank, dp_size
        self.shuffle_window = shuffle_window
        self.names = [s.name for s in self.manifest.sources]
        self._mixture = self._resolve_mixture(mixture or {})
        self._rows = [np.array([sh.sequences for sh in s.shards], dtype=np.int64) for s in self.manifest.sources]
        self._cache = LRU(cache_shards or (shuffle_window + 1) * len(self.names))
        self.shard_loads = 0  # shards read from storage so far (tests and metrics)
        self._pass = 0
        self._consumed = np.zeros(len(self.names), dtype=np.int64)
        self._served = 0  # global sequences served, all passes
        self._tokens = 0  # global target tokens served
        self._set_view(seq_len or self.manifest.seq_len)

    @classmethod
    def from_config(cls, cfg, *, dp_rank: int = 0, dp_size: int = 1, **kwargs) -> "MixtureSampler":
        """The sampler a training run uses: data.dir, seed, train.seq_len, tokenizer and vocab checks."""
        from moray.data.tokenizer import load_tokenizer

        data = cfg.data
        mixture = {s.name: {"epochs": s.epochs, "weight": s.weight} for s in data.sources} or None
        return cls(
            data.dir, seed=cfg.train.seed if data.seed is None else data.seed, dp_rank=dp_rank, dp_size=dp_size,
            seq_len=cfg.train.seq_len, tokenizer_id=load_tokenizer(data.tokenizer).id,
            vocab_size=cfg.model.vocab_size, mixture=mixture, shuffle_window=data.shuffle_window, **kwargs,
        )

    def _resolve_mixture(self, mixture: Mapping) -> Dict[str, Dict]:
        unknown = sorted(set(mixture) - set(self.names))
        if unknown:
            raise DataError(
                f"mixture names source(s) {', '.join(unknown)} that {self.manifest.path} does not hold "
                f"(it has {', '.join(self.names)}); re-run prepare_data.py after changing data.sources"
            )
        out = {}
        for s in self.manifest.sources:
            m = mixture.get(s.name)
            m = {"epochs": s.epochs, "weight": s.weight} if m is None else m
            out[s.name] = {"epochs": m.get("epochs"), "weight": m.get("weight")}  # neither = 1 epoch
        return out

    # -- the order --------------------------------------------------------------

    def _set_view(self, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1 (got {seq_len})")
        units = [view_units(r, self.manifest.seq_len, seq_len) for r in self._rows]
        totals = [int(u.sum()) for u in units]
        for name, n in zip(self.names, totals):
            if n == 0:
                raise DataError(
                    f"data source {name!r} has no shard with {seq_len + 1} tokens (shards in {self.manifest.dir} "
                    f"were prepared at seq_len {self.manifest.seq_len}); prepare with a larger data.shard_sequences "
                    "or train.seq_len"
                )
        self.seq_len = seq_len
        self._orders = [SourceOrder(u, self.shuffle_window) for u in units]
        self._units = np.array(totals, dtype=np.int64)
        mix = [self._mixture[n] for n in self.names]
        self._totals = np.array(
            pass_totals(totals, [m["epochs"] for m in mix], [m["weight"] for m in mix], self.names), dtype=np.int64
        )

    @property
    def pass_sequences(self) -> int:
        """Sequences (all ranks together) in one pass of the mixture at the current seq_len."""
        return int(self._totals.sum())

    def _take(self, n: int):
        """Advance the global position by n; (pass, source, item) of each sequence taken."""
        passes, srcs, items = [], [], []
        while n > 0:
            k = min(n, int((self._totals - self._consumed).sum()))
            s, i = interleave(self._consumed, self._totals, k)
            passes.append(np.full(k, self._pass, dtype=np.int64))
            srcs.append(s)
            items.append(i)
            self._consumed += np.bincount(s, minlength=len(self.names))
            n -= k
            self._roll_pass()
        return np.concatenate(passes), np.concatenate(srcs), np.concatenate(items)

    def _roll_pass(self) -> None:
        if (self._consumed >= self._totals).all():
            self._pass += 1
            self._consumed[:] = 0

    def _locate(self, passes: np.ndarray, srcs: np.ndarray, items: np.ndarray):
        """(shard, unit) of each (pass, source, item)."""
        shard, unit = np.empty_like(items), np.empty_like(items)
        epochs = items // self._units[srcs]
        for p, s, e in sorted({(int(p), int(s), int(e)) for p, s, e in zip(passes, srcs, epochs)}):
            sel = (passes == p) & (srcs == s) & (epochs == e)
            key = salt(self.seed, p, self.names[s], e)
            shard[sel], unit[sel] = self._orders[s].locate(key, items[sel] - e * self._units[s])
        return shard, unit

    # -- reading ------------------------------------------------------------------

    def _stream(self, source: int, shard: int) -> np.ndarray:
        def load():
            rows = self.manifest.read_shard(source, shard)  # verified against the manifest
            self.shard_loads += 1
            L0 = self.manifest.seq_len
            return np.concatenate([rows[:, :L0].reshape(-1), rows[-1, L0:]])  # the packed stream
        return self._cache.get((source, shard), load)

    def next_batch(self, batch_size: int, seq_len: Optional[int] = None, *, with_ids: bool = False):
        """This rank's next `batch_size` sequences: int64 [batch_size, seq_len + 1]
        (input = x[:, :-1], target = x[:, 1:]). with_ids: also (source, shard, unit) per row."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if seq_len is not None and seq_len != self.seq_len:
            self._change(lambda: self._set_view(seq_len))
        passes, srcs, items = self._take(batch_size * self.dp_size)
        mine = slice(self.dp_rank * batch_size, (self.dp_rank + 1) * batch_size)
        passes, srcs, items = passes[mine], srcs[mine], items[mine]
        shard, unit = self._locate(passes, srcs, items)
        L = self.seq_len
        out = np.empty((batch_size, L + 1), dtype=np.int64)
        for b, (s, sh, u) in enumerate(zip(srcs.tolist(), shard.tolist(), unit.tolist())):
            out[b] = self._stream(s, sh)[u * L : u * L + L + 1]
        self._served += batch_size * self.dp_size
        self._tokens += batch_size * self.dp_size * L
        if with_ids:
            return out, np.stack([srcs, shard, unit], axis=1)
        return out

    def _change(self, apply) -> None:
        """Apply a change of view or mixture, carrying each source's fraction of the pass."""
        before = dict(zip(self.names, self._consumed.tolist())), dict(zip(self.names, self._totals.tolist()))
        apply()
        after = rescale(before[0], before[1], dict(zip(self.names, self._totals.tolist())))
        self._consumed = np.array([after[n] for n in self.names], dtype=np.int64)
        self._roll_pass()

    # -- state ----------------------------------------------------------------------

    def state_dict(self) -> Dict:
        """The global position (the same on every rank; JSON-serialisable)."""
        return {
            "version": STATE_VERSION, "data_id": self.manifest.id, "seed": self.seed, "seq_len": self.seq_len,
            "shuffle_window": self.shuffle_window,
            "pass": self._pass, "sources": list(self.names), "consumed": self._consumed.tolist(),
            "totals": self._totals.tolist(), "served": self._served, "tokens": self._tokens,
        }

    def load_state_dict(self, state: Mapping, *, strict: bool = True) -> None:
        """Resume at `state`. strict: the data, seed and mixture must be the ones the state
        was saved with; strict=False carries each source's fraction of the pass over to
        changed data or mixture (sources new to the mixture start at the pass's fraction)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"sampler state version {state.get('version')!r}; this moray reads {STATE_VERSION}")
        self._set_view(int(state["seq_len"]))
        mismatch = [
            what for what, ok in (
                (f"data {state['data_id']} vs {self.manifest.id}", state["data_id"] == self.manifest.id),
                (f"seed {state['seed']} vs {self.seed}", state["seed"] == self.seed),
                (f"shuffle_window {state['shuffle_window']} vs {self.shuffle_window}",
                 state["shuffle_window"] == self.shuffle_window),
                (f"sources {state['sources']} vs {self.names}", state["sources"] == self.names),
                (f"pass totals {state['totals']} vs {self._totals.tolist()}", state["totals"] == self._totals.tolist()),
            ) if not ok
        ]
        if mismatch and strict:
            raise DataError(
                "sampler state does not match this data (" + "; ".join(mismatch) + "): resume with the data, "
                "seed and mixture it was saved with, or load it with strict=False to carry the position over"
            )
        consumed = dict(zip(state["sources"], state["consumed"]))
        totals = dict(zip(state["sources"], state["totals"]))
        now = rescale(consumed, totals, dict(zip(self.names, self._totals.tolist()))) if mismatch else consumed
        self._pass = int(state["pass"])
        self._consumed = np.array([now[n] for n in self.names], dtype=np.int64)
        self._served, self._tokens = int(state["served"]), int(state["tokens"])
        self._roll_pass()

    def progress(self) -> Dict:
        """For metrics: the pass, epochs of each source done in it, sequences and tokens served."""
        return {
            "pass": self._pass,
            "epochs": {n: float(c) / float(u) for n, c, u in zip(self.names, self._consumed, self._units)},
            "sequences": self._served, "tokens": self._tokens,
        }
