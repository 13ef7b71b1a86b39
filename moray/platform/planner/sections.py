"""The plan's sections, built from a resolved request (see plan.py for the order).

Keys are snake_case with the unit in the name (`_bytes`, `_flops`, `_s`,
`_usd`); counts of parameters and tokens are bare (`total_params`, `tokens`).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from moray.model.params import count_params, expert_params
from moray.parallel.config import ParallelConfig
from moray.platform.planner import defaults
from moray.platform.planner.flops import (attention_flops_per_token, flops_per_token, pipeline_bubble,
                                          training_flops, training_flops_with_attention)
from moray.platform.planner.inference import (SERVE_DTYPE_BYTES, ServePlan, ServeSetup, default_serving_layout,
                                              expert_shares, kv_cache_bytes_per_token, serve_stages)
from moray.platform.planner.layouts import Candidate
from moray.platform.planner.memory import PRECISIONS, estimate_memory_per_stage, pipeline_ranks, rank_params
from moray.platform.planner.plan import PlanRequest

MAX_STAGES_LISTED = 16


def serving_bytes(r: PlanRequest) -> int:
    """Bytes per served weight and KV value: serve.dtype, not the training dtype."""
    return SERVE_DTYPE_BYTES[r.config.serve.dtype]


def serving_price(r: PlanRequest) -> Tuple[Optional[float], Optional[str]]:
    """USD per serving GPU-hour and why: a price the request names, else the serving
    accelerator's assumed one (it may not be the training one: --serve-gpu)."""
    acc = r.serve_accelerator or r.accelerator
    if r.price_assumed is None and r.price_per_gpu_hour is not None:
        return r.price_per_gpu_hour, None
    return defaults.planned_price(acc)


def model_section(r: PlanRequest, done: Dict[str, dict]) -> dict:
    cfg, seq = r.model, r.seq_len
    pc = count_params(cfg)
    attention = attention_flops_per_token(cfg, seq)
    return {
        "total_params": pc.total,
        "active_params": pc.active,
        "active_share": pc.active / pc.total,
        "embedding_params": pc.embedding,
        "attention_params": pc.attention,
        "expert_params": pc.experts,
        "router_params": pc.router,
        "norm_params": pc.norms,
        "active_expert_params": pc.active_experts,
        "params_per_expert": cfg.n_layers * expert_params(cfg),
        "n_experts": cfg.n_experts, "top_k": cfg.active_experts, "n_layers": cfg.n_layers,
        "seq_len_tokens": seq, "seq_len_assumed": r.seq_len_assumed,
        "forward_flops_per_token": flops_per_token(cfg, seq),
        "forward_matmul_flops_per_token": 2.0 * pc.active,
        "forward_attention_flops_per_token": attention,
        "dense_equivalent_forward_flops_per_token": 2.0 * pc.total,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg, serving_bytes(r)),
        "kv_cache_dtype": r.config.serve.dtype,
        "kv_cache_dtype_bytes": serving_bytes(r),
    }


def training_section(r: PlanRequest, done: Dict[str, dict]) -> dict:
    """Days and cost at the assumed MFU on the GPUs the training layout uses (all of the
    cluster when no layout fits: the memory section says so)."""
    cfg, seq, batch = r.model, r.seq_len, r.batch_tokens
    peak = r.accelerator.peak_flops
    chosen = r.layout.chosen
    gpus = chosen.layout.gpus if chosen is not None else r.gpus
    with_attention = training_flops_with_attention(cfg, r.tokens, seq)
    papers = training_flops(cfg, r.tokens)
    gpu_hours = with_attention / (peak * r.mfu) / 3600
    gpu_hours_6nd = papers / (peak * r.mfu) / 3600
    price = r.price_per_gpu_hour
    out = {
        "tokens": r.tokens, "tokens_source": r.tokens_source, "seq_len_tokens": seq,
        "seq_len_assumed": r.seq_len_assumed,
        "training_flops": papers,
        "training_flops_with_attention": with_attention,
        "attention_share": 1 - papers / with_attention,
        "gpus": gpus, "cluster_gpus": r.gpus, "gpus_source": r.gpus_source,
        "layout": chosen.layout.label if chosen is not None else None, "layout_source": r.layout.chosen_source,
        "layout_as_configured": r.layout.problem is None,
        "accelerator": r.accelerator.name, "peak_flops_per_gpu": peak,
        "cluster_peak_flops": gpus * peak,
        "mfu": r.mfu, "mfu_source": r.mfu_source,
        "gpu_hours": gpu_hours, "days": gpu_hours / gpus / 24,
        "cost_usd": gpu_hours * price if price is not None else None,
        "gpu_hours_6nd": gpu_hours_6nd, "days_6nd": gpu_hours_6nd / gpus / 24,
        "cost_usd_6nd": gpu_hours_6nd * price if price is not None else None,
        "price_usd_per_gpu_hour": price, "price_assumed": r.price_assumed,
        "implied_mfu": None, "implied_mfu_6nd": None, "given_days": r.days,
    }
    if r.days is not None:
        seconds = r.days * 86400 * gpus * peak
        out["implied_mfu"], out["implied_mfu_6nd"] = with_attention / seconds, papers / seconds
    if batch is not None:
        out["batch_tokens"] = batch
        out["batch_sequences"] = batch / seq
        out["batch_tokens_per_expert"] = batch * cfg.active_experts / cfg.n_experts if cfg.is_moe else None
        out["batch_assumed"] = r.batch_assumed
    return out


def _layout_dict(c: Candidate) -> dict:
    return {**c.layout.to_dict(), "label": c.layout.label, "microbatches": c.step.microbatches,
            **c.memory.to_dict(), "bytes_per_gpu": c.memory.total_bytes}


def memory_section(r: PlanRequest, done: Dict[str, dict]) -> dict:
    """The configured layout on the cluster: whether it runs and why not; the layout the plan
    trains with (the configured one, else the best that runs here) in detail, else the configured
    one, so a layout that fits nowhere still shows where its memory goes."""
    w, p, check = r.workload(), r.config.parallel, r.layout
    conf, chosen = check.configured, check.chosen
    as_configured = conf is not None and chosen is conf
    prec = PRECISIONS[w.dtype]
    out = {
        "configured": {"tp": p.tp, "pp": p.pp, "ep": p.ep, "etp": p.etp or p.tp, "dp": None, "gpus": r.gpus,
                       "runnable": check.problem is None, "problem": check.problem, "fits": as_configured,
                       **(_layout_dict(conf) if conf is not None else {})},
        "fits_as_configured": as_configured,
        "chosen": _layout_dict(chosen) if chosen is not None else None,
        "chosen_source": check.chosen_source,
        "alternatives": check.alternatives,
        "dtype": w.dtype, "dtype_assumed": r.dtype_assumed,
        "bytes_per_param": prec.weight + prec.grad + prec.master + prec.adam,
        "memory_bytes_per_gpu": r.accelerator.memory_bytes,
        "usable_bytes_per_gpu": w.usable_bytes,
        "layout": None,
    }
    shown = chosen or conf
    if shown is None:
        return out
    lay, m = shown.layout, shown.step.microbatches
    par = ParallelConfig(tp=lay.tp, pp=lay.pp, ep=lay.ep, dp=lay.dp, microbatches=m, schedule=p.schedule,
                         virtual_stages=p.virtual_stages, zero=p.zero,
                         activation_checkpointing=lay.activation_checkpointing, etp=lay.etp,
                         recompute=p.recompute, recompute_every=p.recompute_every)
    args = (r.model, par, lay.micro_batch_size, w.seq_len, w.dtype)
    stages = list(range(lay.pp)) if lay.pp <= MAX_STAGES_LISTED else sorted({0, 1, lay.pp - 1})
    per_stage = estimate_memory_per_stage(*args, sequence_parallel=lay.sequence_parallel, stages=stages)
    variants = []
    for zero in (0, 1):
        for ac in (False, True):
            est = max(estimate_memory_per_stage(*args, zero, ac, sequence_parallel=lay.sequence_parallel,
                                                stages=stages), key=lambda e: e.total_bytes)
            variants.append({"zero": zero, "activation_checkpointing": ac, "bytes_per_gpu": est.total_bytes,
                             "optimizer_bytes": est.optimizer_bytes, "activations_bytes": est.activations_bytes,
                             "fits": est.total_bytes <= w.usable_bytes})
    v = p.virtual_stages if p.schedule == "interleaved_1f1b" else 1
    worst = shown.memory
    return {
        **out,
        "layout": {**lay.to_dict(), "microbatches": m, "schedule": p.schedule, "zero": p.zero},
        "stage": worst.stage,
        "bytes_per_gpu": worst.total_bytes,
        "weights_bytes": worst.weights_bytes, "grads_bytes": worst.grads_bytes,
        "optimizer_bytes": worst.optimizer_bytes, "activations_bytes": worst.activations_bytes,
        "zero_and_checkpointing": variants,
        "stages": [e.to_dict() for e in per_stage],
        "pipeline_bubble": pipeline_bubble(lay.pp, m, v),
        "step": shown.step.to_dict(),
    }


def layouts_section(r: PlanRequest, done: Dict[str, dict]) -> dict:
    result = r.layout.search
    kinds: Dict[str, int] = {}
    for rej in result.rejected:
        kinds[rej.kind] = kinds.get(rej.kind, 0) + 1
    return {
        "gpus": r.gpus,
        "feasible_count": len(result.feasible),
        "rejected_count": len(result.rejected),
        "rejected_by_kind": kinds,
        "feasible": [c.to_dict() for c in result.feasible],
        "rejected": [x.to_dict() for x in result.rejected],
    }


def inference_section(r: PlanRequest, done: Dict[str, dict]) -> dict:
    cfg = r.model
    acc = r.serve_accelerator or r.accelerator
    context = r.context or cfg.max_seq_len
    nbytes = serving_bytes(r)
    price, price_assumed = serving_price(r)
    if r.serve_tp is None and r.serve_pp is None:
        tp, pp = default_serving_layout(cfg, acc, r.gpus_per_node, context, nbytes, r.usable_fraction)
        source = "the fewest GPUs holding 8 sequences per stage at this context (pass --serve-tp/--serve-pp)"
    else:
        tp, pp = r.serve_tp or 1, r.serve_pp or 1
        source = "--serve-tp/--serve-pp"
    measured = r.config.serve.expert_shares
    shares = expert_shares(cfg, measured) if measured and cfg.is_moe else None
    plan = ServePlan(ServeSetup(cfg, acc, tp, pp, context, price, nbytes, nbytes,
                                r.usable_fraction, r.gpus_per_node, shares))
    ranks = pipeline_ranks(cfg, pp)
    params_per_stage = max(rank_params(cfg, 1, 1, rk, pp).total for rk in ranks)
    rows = [plan.decode(b).to_dict() for b in plan.batch_ladder()]
    full = plan.decode(max(1, plan.max_batch())).to_dict()
    peak_rate = acc.peak_flops * acc.matmul_efficiency * tp * pp
    return {
        "accelerator": acc.name, "tp": tp, "pp": pp, "gpus": tp * pp, "layout_source": source,
        "context_tokens": context, "dtype": r.config.serve.dtype, "dtype_bytes": nbytes,
        "layers_per_stage": [rk.layers for rk in ranks],
        "params_per_stage": params_per_stage,
        "params_per_gpu": plan.params_per_gpu,
        "weights_bytes_per_gpu": plan.weights_bytes_per_gpu,
        "usable_bytes_per_gpu": plan.usable_bytes,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg, nbytes),
        "kv_cache_bytes_per_token_per_gpu": plan.kv_bytes_per_token_per_gpu,
        "kv_cache_capacity_tokens": plan.kv_capacity_tokens,
        "stages": serve_stages(cfg, tp, pp, r.config.serve.ep if cfg.is_moe else 1, nbytes, nbytes),
        "max_batch": plan.max_batch(),
        "routing": ("dense" if not cfg.is_moe else "uniform" if shares is None
                    else "measured shares (serve.expert_shares, "
                    + ("one row for every layer)" if len(shares) == 1 else "one row per layer)")),
        "decode": rows,
        "tokens_per_s": full["tokens_per_s"],
        "cost_usd_per_1k_tokens": full["cost_usd_per_1k_tokens"],
        "compute_bound_tokens_per_s": peak_rate / flops_per_token(cfg, context),
        "price_usd_per_gpu_hour": price, "price_assumed": price_assumed,
    }
