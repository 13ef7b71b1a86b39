"""Initial weights keyed by parameter name, and any slice of them generated on its own.

Each weight is N(0, init_std) from its own generator, seeded by (seed, name) (a
stacked expert by (seed, name#global expert id)); norms are ones. So any part
of the model built alone (a pipeline stage, an expert shard) gets the whole
model's values: the rule is per name, not per position in a traversal.

A tensor-parallel rank holds a slice of a weight: rows [a, b) of the vocabulary
table, a band of columns of wo or of an expert's F. `normal_` fills exactly that
slice with the values the whole tensor would have, without ever holding the
whole. torch's CPU generator (mt19937) cannot jump ahead, so the whole tensor's
random stream is replayed in pieces and only the slice is kept:

- torch's `normal_` on a float32 tensor of n >= 16 elements draws n uniforms in
  order, turns each aligned block of 16 into 16 normals (Box-Muller), and when
  n % 16 != 0 redraws the last 16. So pieces whose sizes are multiples of 16,
  the last piece taking the remainder, give bit for bit the whole tensor's
  values (tests/test_sharded_init.py checks it on every shape it builds);
- memory: the slice, plus one piece of at most 1/32 of it (and 1M numbers), so
  a rank materialising its share never holds much more than that share;
- time: the random numbers of the whole tensor up to the slice's last element,
  as the whole-width build that sliced afterwards spent (no skip-ahead exists).
  A block-seeded or counter-based scheme would be cheaper for row slices but
  would change every model's initial weights, and column slices (wo, the
  experts' F) would still need whole rows generated.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import nn

MAX_PIECE = 1 << 20  # random numbers generated at a time, at most
_ALIGN = 16  # torch's normal_ transforms uniforms in blocks of 16

# Where a held tensor sits in the whole: (dim, start, whole size along dim); None: it is whole.
Slice = Optional[Tuple[int, int, int]]


def generator_for(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


class _NormalStream:
    """The whole tensor's normals in flat order, handed out in consecutive runs (see the module doc)."""

    def __init__(self, gen: torch.Generator, numel: int, std: float, piece: int):
        self.gen, self.left, self.std, self.piece = gen, numel, std, piece
        self.buf, self.pos = torch.empty(0), 0

    def _refill(self) -> None:
        m = min(self.piece, self.left)
        if 0 < self.left - m < _ALIGN:  # the last piece takes the remainder: its tail redraw is the whole's
            m = self.left
        self.buf, self.pos = torch.empty(m).normal_(0.0, self.std, generator=self.gen), 0
        self.left -= m

    def read(self, n: int) -> torch.Tensor:
        """The next n values (n,)."""
        parts = []
        while n > 0:
            if self.pos == self.buf.numel():
                self._refill()
            take = min(n, self.buf.numel() - self.pos)
            parts.append(self.buf[self.pos:self.pos + take])
            self.pos, n = self.pos + take, n - take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def skip(self, n: int) -> None:
        while n > 0:
            if self.pos == self.buf.numel():
                self._refill()
            take = min(n, self.buf.numel() - self.pos)
            self.pos, n = self.pos + take, n - take


@torch.no_grad()
def normal_(out: torch.Tensor, std: float, seed: int, key: str, where: Slice = None) -> torch.Tensor:
    """Fill `out` (any dtype, contiguous) with its part of the whole tensor N(0, std) keyed by
    (seed, key). where = (dim, start, size): `out` is the whole's [start, start + out.shape[dim])
    along dim, and the whole has `size` there (out's shape elsewhere); None: out is the whole."""
    gen = generator_for(seed, key)
    dim, start, size = where if where is not None else (0, 0, out.shape[0])
    full = list(out.shape)
    full[dim] = size
    numel = math.prod(full)
    whole = where is None or size == out.shape[dim]
    if whole and out.dtype == torch.float32 and out.is_contiguous() and out.device.type == "cpu":
        return out.normal_(0.0, std, generator=gen)  # the whole itself: one call, no copy
    if numel < _ALIGN:  # torch draws these differently (one at a time); tiny, so draw them whole
        vals = torch.empty(full).normal_(0.0, std, generator=gen)
        return out.copy_(vals.narrow(dim, start, out.shape[dim]).view(out.shape))
    outer, inner = math.prod(full[:dim]), math.prod(full[dim + 1:])
    stop = start + out.shape[dim]
    dst = out.view(outer, stop - start, inner)  # (outer, rows held, inner)
    row = size * inner  # one outer index of the whole, flat
    piece = max(_ALIGN, min(MAX_PIECE, out.numel() // 32) // _ALIGN * _ALIGN)
    stream = _NormalStream(gen, numel, std, piece)
    if row <= piece:  # several whole outer rows per read: (g, size, inner) -> their [start, stop)
        g = max(1, piece // row)
        for o in range(0, outer, g):
            n = min(g, outer - o)
            dst[o:o + n].copy_(stream.read(n * row).view(n, size, inner)[:, start:stop])
        return out
    h = max(1, piece // inner)  # rows along dim per read, within one outer index
    for o in range(outer):
        for j in range(0, size, h):
            k = min(h, size - j)
            lo, hi = max(j, start), min(j + k, stop)
            if lo >= hi:
                if o == outer - 1 and j >= stop:
                    return out  # nothing after the slice's last element matters
                stream.skip(k * inner)
                continue
            vals = stream.read(k * inner).view(k, inner)
            dst[o, lo - start:hi - start].copy_(vals[lo - j:hi - j])
    return out


# ---------------------------------------------------------------- the rule per parameter


def is_ones(module: nn.Module) -> bool:
    """Norm weights start at one; every other weight is normal."""
    from moray.model.layers import RMSNorm

    return isinstance(module, RMSNorm)


def parameters_to_init(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str, nn.Parameter]]:
    """(whole-model name, module, attribute, parameter) for each distinct parameter: a tied weight
    once, under its first name (the embedding's), as the whole model names it."""
    seen = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{mod_name}.{p_name}" if mod_name else p_name), module, p_name, p


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, std: float,
                    slice_of: Optional[Callable[[nn.Module, str, nn.Parameter], Slice]] = None) -> None:
    """Give every parameter of `model` its initial values in place (any device and dtype).

    slice_of(module, attribute, param) -> (dim, start, whole size) says where a held tensor sits
    in the whole weight when it holds a slice (a parallel layout's split; for stacked experts the
    dims are the stacked tensor's, dim 0 never split this way: `expert_offset` says which experts
    are held); None or no slice_of: whole. The values are the whole model's, slice or not."""
    from moray.model.moe import GroupedExperts

    for name, module, p_name, p in parameters_to_init(model):
        if is_ones(module):
            p.fill_(1.0)
            continue
        where = slice_of(module, p_name, p) if slice_of is not None else None
        if isinstance(module, GroupedExperts):
            inner = None if where is None else (where[0] - 1, where[1], where[2])  # one expert's dims
            for e in range(p.shape[0]):
                _fill(p[e], std, seed, f"{name}#{module.expert_offset + e}", inner)
        else:
            _fill(p, std, seed, name, where)


def _fill(p: torch.Tensor, std: float, seed: int, key: str, where: Slice) -> None:
    if p.is_contiguous():
        normal_(p, std, seed, key, where)
    else:  # a view we cannot fill in place through .view: fill a copy, then write it back
        p.copy_(normal_(torch.empty(p.shape, dtype=p.dtype), std, seed, key, where))
