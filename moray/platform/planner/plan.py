"""A plan: the request, resolved once, and the sections built from it in order.

Each section is a `Section(name, title, build, render)`: `build(request, done)`
gets the sections built before it (`done["training"]["days"]`, ...) and returns
a JSON-ready dict whose keys are snake_case with their unit in the name;
`render(section)` returns the human report's lines. Adding a section (issue 6's
`goodput`) is one `Section` in `sections()`; its own flags go in `add_arguments`
and reach `build` as `request.options`.

A section that cannot be answered for this request raises PlanError; the plan
keeps `{"error": why}` in its place and goes on, so one impossible part (a
layout that does not fit, a serving layout that does not divide the heads)
never hides the others. Only a malformed request fails as a whole, in
`resolve_request`. The request carries the training layout, decided once
(`layouts.check_layout`): the configured one when it runs on the cluster, else
the best that does; days, cost, memory and goodput are all for it. It also
carries the training inputs as planned: the file's, else a planning default
(defaults.py) whose `*_assumed` reason the report prints beside the figure.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional

from moray.platform.planner import defaults
from moray.platform.planner.catalogue import Accelerator, get_accelerator, load_catalogue
from moray.platform.planner.errors import PlanError
from moray.platform.planner.layouts import LayoutCheck, check_layout, fewest_gpus
from moray.platform.planner.workload import DEFAULT_USABLE_FRACTION, Workload

DEFAULT_MFU = 0.40  # between the seed's 32-36% and Megatron-Core's ~47% for Mixtral on H100


@dataclass
class PlanRequest:
    config: Any  # moray.platform.config.MorayConfig
    accelerator: Accelerator
    catalogue: Mapping[str, Accelerator]
    gpus: int
    gpus_source: str
    gpus_per_node: int
    price_per_gpu_hour: Optional[float]
    mfu: float
    mfu_source: str
    tokens: float
    tokens_source: str
    # The training inputs as planned: the file's, else a planning default, whose reason is
    # `*_assumed` (None: the file, or a flag, gave it). See defaults.py.
    seq_len: int
    seq_len_assumed: Optional[str]
    dtype: str
    dtype_assumed: Optional[str]
    batch_tokens: Optional[int]  # None: the trainer's, dp x micro-batch x microbatches
    batch_assumed: Optional[str]
    price_assumed: Optional[str]
    days: Optional[float] = None  # a duration to turn into an implied MFU
    usable_fraction: float = DEFAULT_USABLE_FRACTION
    serve_accelerator: Optional[Accelerator] = None
    serve_tp: Optional[int] = None
    serve_pp: Optional[int] = None
    context: Optional[int] = None
    seed_check: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    layout: Optional[LayoutCheck] = None  # the training layout, resolved with the cluster

    @property
    def model(self):
        return self.config.model

    def workload(self, accelerator: Optional[Accelerator] = None, gpus_per_node: Optional[int] = None) -> Workload:
        c = self.config
        return Workload(
            model=c.model, accelerator=accelerator or self.accelerator,
            gpus_per_node=gpus_per_node or self.gpus_per_node, seq_len=self.seq_len,
            micro_batch_size=c.train.micro_batch_size, batch_tokens=self.batch_tokens,
            microbatches=c.parallel.microbatches, dtype=self.dtype, zero=c.parallel.zero,
            schedule=c.parallel.schedule, virtual_stages=c.parallel.virtual_stages,
            usable_fraction=self.usable_fraction, activation_checkpointing=c.parallel.activation_checkpointing,
            sequence_parallel=c.parallel.sequence_parallel, etp=c.parallel.etp, recompute=c.parallel.recompute,
            recompute_every=c.parallel.recompute_every, overlap_grad_reduce=c.parallel.overlap_grad_reduce,
            grad_bucket_bytes=c.parallel.grad_bucket_mb * 2 ** 20,
        )


@dataclass(frozen=True)
class Section:
    name: str
    title: str  # the heading when the section could not be built
    build: Callable[[PlanRequest, Dict[str, dict]], dict]
    render: Callable[[dict], List[str]]
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None


def sections() -> List[Section]:
    """The report, in order. Imported late so the registry is one list in one place."""
    from moray.platform.planner import goodput_section as goodput
    from moray.platform.planner import report, seed_check
    from moray.platform.planner import sections as s

    return [
        Section("model", "Model", s.model_section, report.render_model),
        Section("training", "Training", s.training_section, report.render_training),
        Section("memory", "Memory per GPU", s.memory_section, report.render_memory),
        Section("layouts", "Layouts", s.layouts_section, report.render_layouts),
        Section("inference", "Inference", s.inference_section, report.render_inference),
        Section("goodput", "Goodput", goodput.build, goodput.render, goodput.add_arguments),
        Section("seed_check", "The seed, checked", seed_check.seed_check_section, report.render_seed_check),
    ]


def build_plan(request: PlanRequest) -> Dict[str, dict]:
    done: Dict[str, dict] = {"inputs": inputs_section(request)}
    for section in sections():
        if section.name == "seed_check" and not request.seed_check:
            continue
        try:
            done[section.name] = section.build(request, done)
        except PlanError as err:
            done[section.name] = {"error": str(err)}
    return done


def needs(done: Dict[str, dict], name: str) -> dict:
    """An earlier section, for one built from it: its failure becomes this one's reason."""
    if "error" in done[name]:
        raise PlanError(f"needs the {name} section, which could not be built: {done[name]['error']}")
    return done[name]


def inputs_section(r: PlanRequest) -> dict:
    c = r.config
    return {
        "accelerator": r.accelerator.to_dict(),
        "gpus": r.gpus, "gpus_source": r.gpus_source, "gpus_per_node": r.gpus_per_node,
        "price_usd_per_gpu_hour": r.price_per_gpu_hour, "price_assumed": r.price_assumed,
        "mfu": r.mfu, "mfu_source": r.mfu_source,
        "tokens": r.tokens, "tokens_source": r.tokens_source,
        "seq_len_tokens": r.seq_len, "seq_len_assumed": r.seq_len_assumed,
        "micro_batch_size": c.train.micro_batch_size,
        "batch_tokens": r.batch_tokens, "batch_assumed": r.batch_assumed,
        "dtype": r.dtype, "dtype_assumed": r.dtype_assumed,
        "usable_memory_fraction": r.usable_fraction,
    }


def resolve_request(config: Any, *, gpu: Optional[str] = None, gpus: Optional[int] = None,
                    gpus_per_node: Optional[int] = None, price_per_gpu_hour: Optional[float] = None,
                    mfu: Optional[float] = None, tokens: Optional[float] = None, days: Optional[float] = None,
                    accelerators: Optional[str] = None, serve_gpu: Optional[str] = None,
                    serve_tp: Optional[int] = None, serve_pp: Optional[int] = None, context: Optional[int] = None,
                    usable_fraction: float = DEFAULT_USABLE_FRACTION, seed_check: bool = True,
                    options: Optional[Mapping[str, Any]] = None) -> PlanRequest:
    """Fill every input from the flags, else the config file, else a stated default."""
    cluster, train = config.cluster, config.train
    catalogue = load_catalogue(accelerators)
    accelerator = get_accelerator(gpu or cluster.gpu, catalogue)
    if cluster.peak_flops is not None:
        accelerator = replace(accelerator, peak_flops=float(cluster.peak_flops),
                              source=accelerator.source + f"; peak overridden by cluster.peak_flops")
    per_node = gpus_per_node or cluster.gpus_per_node
    for name, value in (("gpus", gpus), ("gpus-per-node", per_node), ("days", days), ("tokens", tokens),
                        ("context", context), ("serve-tp", serve_tp), ("serve-pp", serve_pp)):
        if value is not None and value <= 0:
            raise PlanError(f"--{name} must be positive (got {value})")
    p = config.parallel
    for name, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.ep", p.ep), ("parallel.dp", p.dp),
                        ("parallel.microbatches", p.microbatches), ("cluster.num_workers", cluster.num_workers)):
        if value is not None and value < 1:
            raise PlanError(f"{name} must be at least 1 (got {value})")
    if mfu is not None and not 0 < mfu <= 1:
        raise PlanError(f"--mfu is a fraction of peak, in (0, 1] (got {mfu}); e.g. --mfu 0.35")
    if not 0 < usable_fraction <= 1:
        raise PlanError(f"--memory-fraction must be in (0, 1] (got {usable_fraction})")
    price, price_assumed = _resolve_price(price_per_gpu_hour, cluster.price_per_gpu_hour, accelerator)
    seq_len, seq_len_assumed = defaults.planned_seq_len(config)
    dtype, dtype_assumed = defaults.planned_dtype(config, accelerator)
    request = PlanRequest(
        config=config, accelerator=accelerator, catalogue=catalogue, gpus=0, gpus_source="",
        gpus_per_node=per_node, price_per_gpu_hour=price, price_assumed=price_assumed,
        seq_len=seq_len, seq_len_assumed=seq_len_assumed, dtype=dtype, dtype_assumed=dtype_assumed,
        batch_tokens=train.batch_tokens, batch_assumed=None, mfu=mfu if mfu is not None else DEFAULT_MFU,
        mfu_source="--mfu" if mfu is not None else "assumed; pass --mfu",
        tokens=0.0, tokens_source="", days=days, usable_fraction=usable_fraction,
        serve_accelerator=get_accelerator(serve_gpu, catalogue) if serve_gpu else accelerator,
        serve_tp=serve_tp, serve_pp=serve_pp, context=context, seed_check=seed_check, options=dict(options or {}),
    )
    # A file that gives a step count or a batch describes a run of the trainer: its tokens are
    # that run's. Otherwise the run is planned: Chinchilla's tokens, DeepSeek's batch for them.
    trainer_run = defaults.file_sets(train, "max_steps") or defaults.file_sets_batch(config)
    if tokens is not None:
        request.tokens, request.tokens_source = float(tokens), "--tokens"
    elif not trainer_run:
        request.tokens, request.tokens_source = defaults.chinchilla_tokens(config.model)
    if not trainer_run:
        request.batch_tokens, request.batch_assumed = defaults.planned_batch_tokens(config.model, request.tokens,
                                                                                    seq_len)
    request.gpus, request.gpus_source = _resolve_gpus(request, gpus)
    request.layout = check_layout(request.workload(), p.tp, p.pp, p.ep, request.gpus)
    if not request.tokens_source:  # the trainer's steps, on the layout that trains
        request.tokens, request.tokens_source = _steps_tokens(request)
    return request


def _resolve_price(flag: Optional[float], configured: Optional[float],
                   accelerator: Accelerator) -> tuple[Optional[float], Optional[str]]:
    """--price-per-gpu-hour, else cluster.price_per_gpu_hour, else the catalogue's assumed price."""
    if flag is not None:
        return flag, None
    if configured is not None:
        return configured, None
    return defaults.planned_price(accelerator)


def _resolve_gpus(r: PlanRequest, gpus: Optional[int]) -> tuple[int, str]:
    c = r.config
    if gpus is not None:
        return gpus, "--gpus"
    if c.cluster.num_workers is not None:
        return c.cluster.num_workers, "cluster.num_workers"
    p = c.parallel
    if p.dp is not None:
        return p.tp * p.pp * p.dp, "parallel tp x pp x dp"
    # Nothing pins the cluster: the smallest one on which the configured layout fits.
    fewest = fewest_gpus(r.workload(), p.tp, p.pp, p.ep)
    if fewest is not None:
        return fewest, f"the fewest GPUs on which tp {p.tp} x pp {p.pp} x ep {p.ep} fits; pass --gpus"
    return p.tp * p.pp * p.ep, "parallel tp x pp x ep: no cluster size fits it; pass --gpus"


def _steps_tokens(r: PlanRequest) -> tuple[float, str]:
    """train.max_steps x the batch, ramp included, as the trainer would run them."""
    from moray.platform.schedule import batch_sequences_at

    t, p, seq_len = r.config.train, r.config.parallel, r.seq_len
    chosen = r.layout.chosen
    dp = chosen.layout.dp if chosen is not None else max(1, r.gpus // (p.tp * p.pp))  # the layout that trains
    unit = dp * t.micro_batch_size * p.num_microbatches  # as the trainer rounds a step's sequences
    seen, step = 0, 0
    while step < t.max_steps and seen < t.batch_ramp_tokens:  # the ramp, step by step
        seen += seq_len * batch_sequences_at(seen, seq_len=seq_len, unit=unit, batch_tokens=t.batch_tokens,
                                             batch_tokens_start=t.batch_tokens_start,
                                             batch_ramp_tokens=t.batch_ramp_tokens)
        step += 1
    full = seq_len * batch_sequences_at(seen, seq_len=seq_len, unit=unit, batch_tokens=t.batch_tokens,
                                        batch_tokens_start=t.batch_tokens_start,
                                        batch_ramp_tokens=t.batch_ramp_tokens)
    seen += (t.max_steps - step) * full
    return float(seen), f"train.max_steps {t.max_steps:,} x the configured batch; pass --tokens"
