"""`jobs/pretrain.py --dry-run`: would this run start, and fit? No weights, no workers, no Ray.

    report = dry_run(cfg)     # DryRun: problems (none: it would run), one row per pipeline rank
    print(render(report))

Checked in the order a run meets them:
1. the layout, as the controller checks it before any worker starts (world size,
   dims against the model, a tensor-parallel group inside one node) and as every
   rank checks it before building (engine.check_layout: the schedule, what
   sequence parallelism and expert tensor parallelism need);
2. the batch: sequences per step once the ramp is over (schedule.batch_sequences_at),
   split over dp x microbatches: the micro-batch the ranks will really run;
3. every rank's part, built on `meta` exactly as the rank builds it
   (engine.build_model_parts: its stage(s), its experts, its tensor shards), which
   allocates nothing: its parameters must be what the planner counts for that
   pipeline rank, or the memory below would describe another trainer;
4. each rank's modelled peak memory (moray plan's, planner/memory.py) at that
   micro-batch, against the usable memory of one cluster.gpu (90%, as moray plan).
Ranks that differ only in which copy of the data they train on hold the same
part, so each distinct (stage, tensor rank, expert rank) is built once: for the
seed's layout (tp 8 x pp 15 x ep 16, 24,960 ranks) 1,920 parts, in seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

GIB = 1024 ** 3


@dataclass
class RankRow:
    """One pipeline rank: its modelled memory and the parts its ranks hold."""

    stage: int
    layers: int
    parts: int  # distinct parts built for this pipeline rank (tensor x expert ranks)
    ranks: int  # ranks holding one of them
    params_built: int  # the fullest of those parts (tensor rank 0 has the most vocabulary rows)
    params_planned: int
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    total_bytes: float  # the peak: the larger of the backward's and the optimizer step's (planner/memory.py)

    @property
    def held_bytes(self) -> float:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes


@dataclass
class DryRun:
    layout: Dict[str, object]
    world_size: int
    micro_batch_size: int  # sequences per microbatch once the batch ramp is over
    microbatches: int
    global_sequences: int
    accelerator: str
    usable_bytes: float
    rows: List[RankRow] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def dry_run(cfg) -> DryRun:
    """Everything about `cfg` (a MorayConfig) that can be checked without running it."""
    from moray.parallel import ParallelDims
    from moray.parallel.dims import LayoutError
    from moray.parallel.engine import check_layout
    from moray.platform.config import ConfigError
    from moray.platform.controller import validate_layout
    from moray.platform.planner.catalogue import get_accelerator
    from moray.platform.planner.workload import DEFAULT_USABLE_FRACTION

    p, t = cfg.parallel, cfg.train
    acc = get_accelerator(cfg.cluster.gpu)
    report = DryRun(layout={k: v for k, v in p.to_dict().items() if v is not None}, world_size=cfg.world_size(),
                    micro_batch_size=t.micro_batch_size, microbatches=p.num_microbatches, global_sequences=0,
                    accelerator=acc.name, usable_bytes=acc.memory_bytes * DEFAULT_USABLE_FRACTION)
    try:
        validate_layout(cfg)
        dims = ParallelDims.from_config(p, report.world_size)
        check_layout(cfg.model, p, dims)
    except (ConfigError, LayoutError, ValueError) as err:
        report.problems.append(str(err).removeprefix("bad layout: "))
        return report
    report.layout["dp"] = dims.dp
    _batch(cfg, dims, report)
    built = _build_every_rank(cfg, dims)
    _memory(cfg, dims, built, report)
    return report


def _batch(cfg, dims, report: DryRun) -> None:
    """The micro-batch the ranks run at the full batch (the ramp only makes it smaller)."""
    from moray.platform.schedule import batch_sequences_at

    t, m = cfg.train, report.microbatches
    unit = dims.dp * t.micro_batch_size * m
    kw = dict(seq_len=t.seq_len, unit=unit, batch_tokens=t.batch_tokens, batch_tokens_start=t.batch_tokens_start,
              batch_ramp_tokens=t.batch_ramp_tokens)
    report.global_sequences = batch_sequences_at(t.batch_ramp_tokens, **kw)
    report.micro_batch_size = report.global_sequences // (dims.dp * m)
    if t.batch_tokens is not None and report.global_sequences * t.seq_len > 1.05 * t.batch_tokens:
        report.notes.append(
            f"train.batch_tokens {t.batch_tokens:,} is less than one round of dp {dims.dp} x microbatches {m} x "
            f"micro-batch {t.micro_batch_size} sequences of {t.seq_len}: each step runs "
            f"{report.global_sequences * t.seq_len:,} tokens")


def _build_every_rank(cfg, dims) -> Dict[int, List[int]]:
    """Pipeline rank -> the parameter count of each distinct part its ranks hold, built on meta."""
    import torch

    from moray.parallel.engine import build_model_parts, sequence_parallel_of
    from moray.parallel.pipeline import partition_layers, virtual_stages_of

    p = cfg.parallel
    n_stages = dims.pp * (virtual_stages_of(p) if dims.pp > 1 else 1)
    split = partition_layers(cfg.model, n_stages, tp=dims.tp, sequence_parallel=sequence_parallel_of(p, dims))
    out: Dict[int, List[int]] = {}
    seen = set()
    for rank in range(dims.world_size):
        c = dims.coords(rank)
        key = dataclasses.replace(c, dp=0, edp=0)  # data-parallel copies hold the same part
        if key in seen:
            continue
        seen.add(key)
        parts = build_model_parts(cfg.model, p, dims, rank, None, torch.device("meta"), cfg.train.seed,
                                  stage_layers=split)
        distinct = {id(q): q for part in parts for q in part.parameters()}
        out.setdefault(c.pp, []).append(sum(q.numel() for q in distinct.values()))
    return out


def _memory(cfg, dims, built: Dict[int, List[int]], report: DryRun) -> None:
    from moray.platform.planner.errors import PlanError
    from moray.platform.planner.memory import estimate_memory_per_stage

    p, t = cfg.parallel, cfg.train
    try:
        stages = estimate_memory_per_stage(cfg.model, p, report.micro_batch_size, t.seq_len, t.dtype, dp=dims.dp,
                                           microbatches=report.microbatches,
                                           fused_adamw=cfg.cluster.use_gpu)  # the CPU's AdamW is per tensor
    except PlanError as err:
        report.problems.append(f"the planner cannot model this layout: {err}")
        return
    copies = dims.world_size // sum(len(v) for v in built.values())
    for est in stages:
        counts = built[est.stage]
        row = RankRow(est.stage, est.layers, len(counts), len(counts) * copies, max(counts), est.params,
                      est.weights_bytes, est.grads_bytes, est.optimizer_bytes, est.activations_bytes, est.total_bytes)
        report.rows.append(row)
        if row.params_built != row.params_planned:
            report.problems.append(
                f"pipeline rank {row.stage}: a rank builds {row.params_built:,} parameters but the planner counts "
                f"{row.params_planned:,}; its memory model does not describe this trainer (a bug: please report it)")
    worst = max(report.rows, key=lambda r: r.total_bytes)
    if worst.total_bytes > report.usable_bytes:
        report.problems.append(
            f"pipeline rank {worst.stage} needs {worst.total_bytes / GIB:.2f} GiB per GPU (weights "
            f"{worst.weights_bytes / GIB:.2f}, grads {worst.grads_bytes / GIB:.2f}, optimizer "
            f"{worst.optimizer_bytes / GIB:.2f}, activations {worst.activations_bytes / GIB:.2f}) > "
            f"{report.usable_bytes / GIB:.2f} GiB usable on {report.accelerator}; {_what_would_help(cfg, report)}")


def _what_would_help(cfg, report: DryRun) -> str:
    p, hints = cfg.parallel, []
    if report.micro_batch_size > 1:
        hints.append("a smaller train.micro_batch_size (more parallel.microbatches for the same batch)")
    if not p.activation_checkpointing:
        hints.append("parallel.activation_checkpointing=true")
    if p.tp > 1 and not p.sequence_parallel:
        hints.append("parallel.sequence_parallel=true")
    if not p.zero:
        hints.append("parallel.zero=1")
    hints.append(f"or `moray plan --config FILE --gpus {report.world_size}` for a layout that fits")
    return "try " + ", ".join(hints)


def render(report: DryRun) -> str:
    lay = report.layout
    head = (f"dry run: tp {lay.get('tp')} x pp {lay.get('pp')} x dp {lay.get('dp', '?')}, ep {lay.get('ep')} "
            f"= {report.world_size:,} ranks")
    lines = [head]
    if report.rows:
        lines.append(f"  micro-batch {report.micro_batch_size} x {report.microbatches} microbatches per dp rank "
                     f"({report.global_sequences:,} sequences per step), sequence parallel "
                     f"{'on' if lay.get('sequence_parallel') else 'off'}, activation checkpointing "
                     f"{'on' if lay.get('activation_checkpointing') else 'off'}, ZeRO-{lay.get('zero')}")
        lines.append(f"  every rank's part built on meta; modelled peak memory per rank against "
                     f"{report.usable_bytes / GIB:.2f} GiB usable on {report.accelerator}")
        lines.append("")
        # GiB for real layouts; a CPU-sized model reads better in MiB
        unit, name = (GIB, "GiB") if max(r.total_bytes for r in report.rows) >= GIB else (1024 ** 2, "MiB")
        cols = ("stage", "layers", "parts", "ranks", "params/rank", "weights", "grads", "optimizer", "activations",
                "peaks", f"total {name}")
        table = [cols] + [(str(r.stage), str(r.layers), f"{r.parts:,}", f"{r.ranks:,}", f"{r.params_built:,}",
                           *(f"{b / unit:.2f}" for b in (r.weights_bytes, r.grads_bytes, r.optimizer_bytes,
                                                        r.activations_bytes, r.total_bytes - r.held_bytes,
                                                        r.total_bytes)))
                          for r in report.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        for i, row in enumerate(table):
            lines.append("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)))
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        lines.append("  parts: distinct parts built (tensor x expert ranks); ranks: the ranks holding them; peaks: "
                     "the rotary tables and the backward's workspace (or the optimizer step's, when larger) on top "
                     "of the state and the saved activations (planner/transients.py)")
        lines.append("")
    lines += [f"  note: {n}" for n in report.notes]
    if report.ok:
        lines.append(f"dry run: OK, would run on {report.world_size:,} workers")
    else:
        lines += ["dry run: would NOT run:"] + [f"  - {why}" for why in report.problems]
    return "\n".join(lines)


def layout_overrides(layout: Dict[str, object], micro_batch_size: Optional[int] = None) -> List[str]:
    """--set overrides that select a layout of `moray plan --json` (memory.layout or a feasible
    layout): what a user passes to the dry run, then to the run."""
    keys = ("tp", "pp", "ep", "etp", "dp", "microbatches", "activation_checkpointing", "sequence_parallel", "zero",
            "schedule")
    layout = dict(layout)
    if layout.get("microbatches") is None and isinstance(layout.get("step"), dict):
        layout["microbatches"] = layout["step"].get("microbatches")  # a ranked layout carries it in its step
    out = [f"parallel.{k}={str(layout[k]).lower() if isinstance(layout[k], bool) else layout[k]}"
           for k in keys if layout.get(k) is not None]
    mbs = micro_batch_size if micro_batch_size is not None else layout.get("micro_batch_size")
    if mbs is not None:
        out.append(f"train.micro_batch_size={mbs}")
    return out
