"""Training layouts: check one, or search all TP x PP x EP x DP on a cluster.

A layout is feasible when it divides the cluster (world = tp x pp x dp; ep
carved out of dp, or with etp 1 out of tp x dp: moray/parallel/dims.py), keeps
tensor parallelism inside a node, splits the heads,
the FFN columns and the experts evenly, gives every stage a layer, and fits
the card at some micro-batch size (the configured one or a power-of-two
fraction) with or without activation checkpointing. Feasible layouts are
ranked by modelled throughput (steptime.py); each rejected one keeps its reason.
Checking the configured layout never fails: it says why that layout cannot run
on the cluster, what would, and picks the fastest of those to plan with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from moray.parallel.config import ParallelConfig
from moray.platform.planner.memory import MemoryEstimate, estimate_memory_per_stage
from moray.platform.planner.steptime import StepEstimate, estimate_step
from moray.platform.planner.units import gib
from moray.platform.planner.workload import Workload


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    ep: int
    dp: int
    micro_batch_size: int = 1
    activation_checkpointing: bool = False
    sequence_parallel: bool = False
    etp: Optional[int] = None  # expert tensor parallelism; None = tp (the trainer's default)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def label(self) -> str:
        etp = f" etp{self.etp}" if self.expert_tp != self.tp else ""
        return f"tp{self.tp} pp{self.pp} ep{self.ep}{etp} dp{self.dp}"

    def to_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, "etp": self.expert_tp, "dp": self.dp, "gpus": self.gpus,
                "micro_batch_size": self.micro_batch_size, "activation_checkpointing": self.activation_checkpointing,
                "sequence_parallel": self.sequence_parallel}

    @property
    def variant(self) -> str:
        extras = ["checkpointing"] * self.activation_checkpointing + ["sequence parallel"] * self.sequence_parallel
        return ", ".join([f"micro-batch {self.micro_batch_size}"] + extras)


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryEstimate  # the rank with the most memory
    step: StepEstimate

    def to_dict(self) -> dict:
        return {**self.layout.to_dict(), "bytes_per_gpu": self.memory.total_bytes,
                "memory": self.memory.to_dict(), "step": self.step.to_dict()}


@dataclass(frozen=True)
class Rejection:
    layout: Layout
    kind: str  # "structure" | "memory"
    reason: str
    bytes_per_gpu: Optional[float] = None  # memory: what its leanest variant needs

    def to_dict(self) -> dict:
        return {"tp": self.layout.tp, "pp": self.layout.pp, "ep": self.layout.ep, "etp": self.layout.expert_tp,
                "dp": self.layout.dp, "kind": self.kind, "reason": self.reason, "bytes_per_gpu": self.bytes_per_gpu}


@dataclass
class SearchResult:
    n_gpus: int
    feasible: List[Candidate] = field(default_factory=list)  # fastest first
    rejected: List[Rejection] = field(default_factory=list)


def structural_problem(w: Workload, tp: int, pp: int, ep: int, n_gpus: int, etp: Optional[int] = None) -> Optional[str]:
    """Why tp x pp x ep (experts split over etp tensor ranks, None = tp) cannot run on n_gpus at
    all (memory aside), or None."""
    cfg = w.model
    etp = tp if etp is None else etp
    if min(tp, pp, ep) < 1:
        return f"tp, pp and ep must be at least 1 (got tp {tp}, pp {pp}, ep {ep})"
    if tp > w.gpus_per_node:
        return (f"tp {tp} spans nodes ({w.gpus_per_node} GPUs per node): its all-reduces run in every "
                f"block and need NVLink; use tp <= {w.gpus_per_node}")
    if n_gpus % (tp * pp):
        return f"{n_gpus:,} GPUs are not divisible by tp x pp = {tp * pp}"
    dp = n_gpus // (tp * pp)
    for name, size in (("n_heads", cfg.n_heads), ("ffn_hidden", cfg.ffn_hidden)):
        if size % tp:
            return f"tp {tp} does not divide model.{name} = {size}"
    if cfg.n_kv_heads % tp and tp % cfg.n_kv_heads:
        return f"tp {tp} and model.n_kv_heads {cfg.n_kv_heads}: one must divide the other"
    if pp > cfg.n_layers:
        return f"pp {pp} is more stages than the model's {cfg.n_layers} layers"
    if ep > 1 and not cfg.is_moe:
        return "ep > 1 but the model is dense (model.n_experts = 1)"
    if cfg.n_experts % ep:
        return f"ep {ep} does not divide model.n_experts = {cfg.n_experts}"
    if etp < 1 or tp % etp:
        return f"etp {etp} does not divide tp {tp} (an expert-tensor group is part of a tensor-parallel group)"
    if etp == tp and dp % ep:
        return (f"ep {ep} does not divide dp {dp} (with etp = tp expert parallelism is carved out of data "
                "parallelism; etp 1 spreads it over tp x dp)")
    if (dp * tp) % (ep * etp):
        return f"ep {ep} x etp {etp} does not divide dp {dp} x tp {tp}"
    if etp < tp and cfg.is_moe and not (w.allow_sequence_parallel and w.seq_len % tp == 0):
        return (f"etp {etp} < tp {tp} needs sequence parallelism (tensor ranks must route different tokens), "
                f"which seq_len {w.seq_len} over tp {tp} does not allow; use etp {tp}")
    if w.sequence_parallel and tp > 1 and w.seq_len % tp:
        return (f"sequence parallelism splits each sequence over tp {tp}, but seq_len {w.seq_len} is not a "
                f"multiple of it; use another tp or parallel.sequence_parallel=false")
    if w.batch_tokens is not None and dp * w.seq_len > w.batch_tokens:
        return (f"dp {dp} x seq_len {w.seq_len} is more than the global batch of {w.batch_tokens:,} tokens: "
                "some data-parallel ranks would get no sequence")
    most = w.microbatches_for(pp, dp, 1)
    if pp > 1 and w.schedule != "gpipe" and most < pp:
        given = (f"parallel.microbatches is {most}" if w.microbatches is not None else
                 f"the batch gives at most {most} at dp {dp}")
        return f"{w.schedule} needs at least pp = {pp} microbatches per step; {given}"
    return None


def schedule_fits(w: Workload, pp: int, dp: int, micro_batch_size: int) -> bool:
    """1F1B needs pp microbatches in flight (the trainer refuses fewer)."""
    return pp == 1 or w.schedule == "gpipe" or w.microbatches_for(pp, dp, micro_batch_size) >= pp


def _micro_batch_sizes(largest: int) -> List[int]:
    sizes, mbs = [], max(1, largest)
    while mbs >= 1:
        sizes.append(mbs)
        mbs //= 2
    return sizes


def memory_of(w: Workload, layout: Layout) -> MemoryEstimate:
    """The fullest rank of a layout: stage 0 has the embedding and the most microbatches in
    flight, stage 1 the most blocks of the rest (earlier stages take more), the last the head."""
    par = ParallelConfig(tp=layout.tp, pp=layout.pp, ep=layout.ep, dp=layout.dp, schedule=w.schedule,
                         virtual_stages=w.virtual_stages, zero=w.zero,
                         activation_checkpointing=layout.activation_checkpointing,
                         sequence_parallel=layout.sequence_parallel, etp=layout.etp, recompute=w.recompute,
                         recompute_every=w.recompute_every)
    m = w.microbatches_for(layout.pp, layout.dp, layout.micro_batch_size)
    stages = sorted({0, min(1, layout.pp - 1), layout.pp - 1})
    per_stage = estimate_memory_per_stage(w.model, par, layout.micro_batch_size, w.seq_len, w.dtype,
                                          sequence_parallel=layout.sequence_parallel, microbatches=m, stages=stages)
    return max(per_stage, key=lambda e: e.total_bytes)


def evaluate(w: Workload, layout: Layout, step: Optional[StepEstimate] = None) -> Candidate:
    """Memory of the fullest rank and the modelled step, for one fully specified layout."""
    if step is None:
        step = estimate_step(w, layout.tp, layout.pp, layout.ep, layout.dp, layout.micro_batch_size,
                             layout.activation_checkpointing, layout.sequence_parallel, layout.etp)
    return Candidate(layout, memory_of(w, layout), step)


def best_variant(w: Workload, tp: int, pp: int, ep: int, dp: int,
                 etp: Optional[int] = None) -> tuple[Optional[Candidate], Candidate]:
    """The fastest variant that fits (or None), and the leanest one. Variants: the configured
    micro-batch and its halves, activation checkpointing off/on, sequence parallelism off/on
    when tp > 1 and the trainer can run it (seq_len a multiple of tp). Checkpointing only adds
    time, so it is tried only when no variant without it fits; sequence parallelism saves
    memory and (with ep > 1 or pp > 1) exchange time, so both settings are compared. etp < tp
    (experts whole or split over part of a tensor group) runs only with sequence parallelism."""
    sps = (False, True) if tp > 1 and w.allow_sequence_parallel and w.seq_len % tp == 0 else (False,)
    if etp is not None and etp < tp and w.model.is_moe:
        sps = (True,)
    sizes = [m for m in _micro_batch_sizes(w.micro_batch_size) if schedule_fits(w, pp, dp, m)] or [1]
    leanest = evaluate(w, Layout(tp, pp, ep, dp, sizes[-1], True, sps[-1], etp))
    if leanest.memory.total_bytes > w.usable_bytes:
        return None, leanest
    best = None
    for mbs in sizes:
        for ac in (False, True):
            fitting = [lay for lay in (Layout(tp, pp, ep, dp, mbs, ac, sp, etp) for sp in sps)
                       if memory_of(w, lay).total_bytes <= w.usable_bytes]
            for c in (evaluate(w, lay) for lay in fitting):
                if best is None or c.step.modeled_mfu > best.step.modeled_mfu * (1 + 1e-9):
                    best = c
            if fitting:
                break
    return best, leanest


def memory_reason(w: Workload, c: Candidate) -> str:
    m = c.memory
    return (f"needs {gib(m.total_bytes):.2f} GiB per GPU on stage {m.stage} (weights {gib(m.weights_bytes):.1f}, "
            f"grads {gib(m.grads_bytes):.1f}, optimizer {gib(m.optimizer_bytes):.1f}, activations "
            f"{gib(m.activations_bytes):.1f}) > {gib(w.usable_bytes):.2f} GiB usable on "
            f"{w.accelerator.name}, even at {c.layout.variant}")


def divisors(n: int) -> List[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def expert_layouts(w: Workload, tp: int, dp: int) -> List[tuple]:
    """(ep, etp) pairs to try: experts split like the blocks (etp = tp, ep divides dp) and, at
    tp > 1, whole experts with the expert group spread over tp x dp (etp 1, ep divides dp x tp)."""
    cfg = w.model
    if not cfg.is_moe:
        return [(1, None)]
    pairs = [(e, None) for e in divisors(math.gcd(cfg.n_experts, dp))]
    if tp > 1:
        pairs += [(e, 1) for e in divisors(math.gcd(cfg.n_experts, dp * tp))]
    return pairs


def search_layouts(w: Workload, n_gpus: int) -> SearchResult:
    cfg = w.model
    result = SearchResult(n_gpus=n_gpus)
    for tp in [t for t in divisors(w.gpus_per_node) if n_gpus % t == 0]:
        for pp in [p for p in divisors(n_gpus // tp) if p <= cfg.n_layers]:
            dp = n_gpus // (tp * pp)
            for ep, etp in expert_layouts(w, tp, dp):
                shape = Layout(tp, pp, ep, dp, etp=etp)
                problem = structural_problem(w, tp, pp, ep, n_gpus, etp)
                if problem:
                    result.rejected.append(Rejection(shape, "structure", problem))
                    continue
                best, leanest = best_variant(w, tp, pp, ep, dp, etp)
                if best is None:
                    result.rejected.append(Rejection(shape, "memory", memory_reason(w, leanest),
                                                     leanest.memory.total_bytes))
                else:
                    result.feasible.append(best)
    result.feasible.sort(key=lambda c: -c.step.modeled_mfu)
    return result


def nearest_multiples(n: int, unit: int) -> List[int]:
    below, above = (n // unit) * unit, -(-n // unit) * unit
    return sorted({x for x in (below, above) if x > 0})


def fewest_gpus(w: Workload, tp: int, pp: int, ep: int, most: int = 1 << 20) -> Optional[int]:
    """The smallest cluster (up to `most` GPUs) on which tp x pp x ep (experts over w.etp) runs and
    fits, or None."""
    etp = w.etp
    unit, dp = tp * pp, ep
    step = ep if etp is None or etp == tp else 1
    dp = dp if etp is None or etp == tp else 1
    while min(tp, pp, ep) >= 1 and unit * dp <= most:
        if structural_problem(w, tp, pp, ep, unit * dp, etp) is None and best_variant(w, tp, pp, ep, dp, etp)[0]:
            return unit * dp
        dp = dp * 2 if dp >= 64 * step else dp + step
    return None


@dataclass(frozen=True)
class LayoutCheck:
    """The configured layout on a cluster, and the layout the plan trains with."""

    search: SearchResult  # every layout of the cluster, for the alternatives and the layouts section
    configured: Optional[Candidate]  # as the config asks (micro-batch, checkpointing); None: it does not divide
    chosen: Optional[Candidate]  # the configured one, else its fastest fitting variant, else the fastest layout
    # that runs here; None when nothing does. Days, cost and goodput are for it.
    chosen_source: str
    problem: Optional[str] = None  # why the configured layout cannot run on this cluster
    alternatives: List[str] = field(default_factory=list)  # what would run instead


def check_layout(w: Workload, tp: int, pp: int, ep: int, n_gpus: int) -> LayoutCheck:
    """The configured layout on n_gpus: its fastest fitting variant, else why it cannot run,
    what would, and the best of those to plan with."""
    search = search_layouts(w, n_gpus)
    etp = w.etp
    problem = structural_problem(w, tp, pp, ep, n_gpus, etp)
    if problem is None and etp is not None and etp < tp and w.model.is_moe and not w.sequence_parallel:
        problem = (f"etp {etp} < tp {tp} needs parallel.sequence_parallel=true (tensor ranks must route "
                   f"different tokens); set it, or etp {tp}")
    configured = None
    if problem is None:
        dp = n_gpus // (tp * pp)
        configured = evaluate(w, Layout(tp, pp, ep, dp, w.micro_batch_size, w.activation_checkpointing,
                                        w.sequence_parallel and tp > 1, etp))
        if configured.memory.total_bytes <= w.usable_bytes:
            return LayoutCheck(search, configured, configured, "as configured")
        best, leanest = best_variant(w, tp, pp, ep, dp, etp)
        if best is not None:
            return LayoutCheck(search, configured, best, f"the configured layout at {best.layout.variant}, "
                                                         "its fastest variant that fits")
        problem = memory_reason(w, leanest)
    alternatives, options = [], search.feasible[:1]
    dp = n_gpus // (tp * pp)
    if configured is not None:  # memory: other expert-parallel degrees of the same layout first
        for other, other_etp in [(e, t) for e, t in expert_layouts(w, tp, dp) if (e, t) != (ep, etp)]:
            if structural_problem(w, tp, pp, other, n_gpus, other_etp):
                continue
            best = best_variant(w, tp, pp, other, dp, other_etp)[0]
            if best is not None:
                flags = f"parallel.ep={other}" + (f" --set parallel.etp={other_etp}" if other_etp else "")
                alternatives.append(f"ep {other} (--set {flags}): {best.layout.label}, "
                                    f"{best.layout.variant}, {gib(best.memory.total_bytes):.1f} GiB")
                break
    if n_gpus % (tp * pp) and tp <= w.gpus_per_node:
        sizes = nearest_multiples(n_gpus, tp * pp)
        runs = [x for x in sizes if structural_problem(w, tp, pp, ep, x, etp) is None]
        alternatives.append(f"{' or '.join(f'{x:,}' for x in runs)} GPUs keep tp {tp} x pp {pp} x ep {ep}" if runs
                            else f"{' or '.join(f'{x:,}' for x in sizes)} GPUs divide by tp {tp} x pp {pp}, but "
                                 f"even there: {structural_problem(w, tp, pp, ep, sizes[-1], etp)}")
        if dp * tp * pp in runs:  # the configured layout on fewer GPUs, leaving the rest idle
            fewer = best_variant(w, tp, pp, ep, dp, etp)[0]
            if fewer is not None:
                options.append(fewer)
    if search.feasible:
        alternatives.append(f"on {n_gpus:,} GPUs: " + "; ".join(
            f"{c.layout.label} ({c.layout.variant}, {gib(c.memory.total_bytes):.1f} GiB)"
            for c in search.feasible[:3]))
    elif not options:
        fewest = fewest_gpus(w, tp, pp, ep)
        alternatives.append(f"no layout of this model fits {n_gpus:,} x {w.accelerator.name}; "
                            + (f"tp {tp} x pp {pp} x ep {ep} fits from {fewest:,} GPUs" if fewest else
                               "use more GPUs or a card with more memory"))
    chosen = max(options, key=lambda c: c.step.tokens_per_s, default=None)
    if chosen is None:
        source = f"no layout fits {n_gpus:,} x {w.accelerator.name}"
    elif chosen.layout.gpus < n_gpus:
        source = (f"the configured layout on {chosen.layout.gpus:,} of the {n_gpus:,} GPUs "
                  f"({n_gpus - chosen.layout.gpus:,} idle), the fastest that fits")
    else:
        source = (f"the fastest layout that fits {n_gpus:,} x {w.accelerator.name}, as the configured one "
                  "cannot run here")
    return LayoutCheck(search, configured, chosen, source, problem, alternatives)
