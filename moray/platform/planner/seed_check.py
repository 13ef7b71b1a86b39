"""The seed's GPT-4 claims beside the planner's numbers for this config's model.

Every "seed" value below is quoted from ../shared/seed/000_1fde334d99a123df.txt;
every "ours" value is computed here, from the config's model, on the seed's
clusters. A verdict compares the two: "agrees" within 10%, "close" within 25%,
"differs" beyond; notes say which assumption makes a claim hold or not.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional

from moray.model.params import count_params, expert_params
from moray.platform.planner.catalogue import get_accelerator
from moray.platform.planner.errors import PlanError
from moray.platform.planner.flops import flops_per_token, training_flops, training_flops_with_attention
from moray.platform.planner.inference import ServePlan, ServeSetup
from moray.platform.planner.layouts import best_variant
from moray.platform.planner.memory import pipeline_ranks, rank_params
from moray.platform.planner.plan import PlanRequest
from moray.platform.planner.units import count, gib, money, num, pct, si

SEED = {  # the thread's numbers, as written
    "total_params": 1.8e12, "params_per_expert": 111e9, "attention_params": 55e9, "active_params": 280e9,
    "forward_flops_written": 560e12, "dense_forward_flops_written": 3700e12,  # "~560 TFLOPs", "~3,700 TFLOP"
    "tokens": 13e12, "training_flops": 2.15e25, "gpus": 25_000, "gpu": "a100-40gb", "price": 1.0,
    "mfu": (0.32, 0.36), "days": (90, 100), "cost_usd": 63e6,
    "seq_len": 8192, "batch_tokens": 60e6, "batch_tokens_per_expert": 7.5e6, "tp": 8, "pp": 15,
    "h100_gpus": 8192, "h100_days": 55, "h100_cost_usd": 21.5e6, "h100_price": 2.0,
    "serve_tp": 8, "serve_pp": 16, "params_per_node": 130e9, "serve_context": 8192,
    "serve_cost_a100": 0.0049, "serve_cost_h100": 0.0021,  # "$0.0049 cents per 1k tokens" (sic)
}
DAY = 86400.0


def verdict(ours: float, seed: float) -> str:
    ratio = ours / seed
    return "agrees" if abs(ratio - 1) <= 0.10 else "close" if abs(ratio - 1) <= 0.25 else "differs"


def row(claim: str, seed, ours, unit: str, note: str = "", verdict_: Optional[str] = None) -> dict:
    if verdict_ is None:
        verdict_ = verdict(ours, seed) if isinstance(ours, (int, float)) and isinstance(seed, (int, float)) else ""
    return {"claim": claim, "seed": seed, "ours": ours, "unit": unit, "verdict": verdict_, "note": note}


def seed_check_section(r: PlanRequest, done: Dict[str, dict]) -> dict:
    cfg, S = r.model, SEED
    pc = count_params(cfg)
    a100, h100 = get_accelerator(S["gpu"], r.catalogue), get_accelerator("h100-80gb", r.catalogue)
    rows: List[dict] = [
        row("total parameters", S["total_params"], pc.total, "params"),
        row("parameters per expert (MLP, all layers)", S["params_per_expert"],
            cfg.n_layers * expert_params(cfg), "params"),
        row("shared attention parameters", S["attention_params"], pc.attention, "params"),
        row("active parameters per token", S["active_params"], pc.active, "params"),
    ]
    fwd, fwd_attn = 2.0 * pc.active, flops_per_token(cfg, S["seq_len"])
    rows.append(row(
        "forward FLOPs per token", "~560 TFLOP", fwd, "FLOP",
        f"the seed writes ~560 TFLOP; 2 x 280B = 560 GFLOP: it means GFLOP, 1,000x less. Ours: "
        f"2 x {count(pc.active)} = {si(fwd, 'FLOP')}, {si(fwd_attn, 'FLOP')} with attention over "
        f"{S['seq_len']:,} tokens", f"unit slip; {verdict(fwd, S['forward_flops_written'] / 1e3)} as GFLOP"))
    rows.append(row(
        "dense-equivalent forward FLOPs per token", "~3,700 TFLOP", 2.0 * pc.total, "FLOP",
        f"same slip: 2 x 1.8T = 3,600 GFLOP; ours 2 x {count(pc.total)} = {si(2 * pc.total, 'FLOP')}",
        f"unit slip; {verdict(2.0 * pc.total, S['dense_forward_flops_written'] / 1e3)} as GFLOP"))

    papers = training_flops(cfg, S["tokens"])
    with_attention = training_flops_with_attention(cfg, S["tokens"], S["seq_len"])
    rows.append(row("training FLOPs on 13T tokens (6ND)", S["training_flops"], papers, "FLOP",
                    f"{with_attention:.3g} with the attention-score term"))
    cluster = S["gpus"] * a100.peak_flops
    days = [papers / (cluster * m) / DAY for m in S["mfu"]]
    days_attn = [with_attention / (cluster * m) / DAY for m in S["mfu"]]
    overlap = days[1] <= S["days"][1] and days[0] >= S["days"][0] * 0.9
    rows.append(row(f"days on {S['gpus']:,} A100 at 32-36% MFU", "90-100", f"{num(days[1])}-{num(days[0])}", "days",
                    f"6ND as the seed counts; {num(days_attn[1])}-{num(days_attn[0])} days if MFU counts "
                    "attention (PaLM)", "agrees" if overlap else "differs"))
    implied = [papers / (cluster * d * DAY) for d in S["days"][::-1]]
    rows.append(row("MFU that 90-100 days implies", "32%-36%", f"{pct(implied[0])}-{pct(implied[1])}", "",
                    f"of {a100.peak_flops / 1e12:.0f} TFLOP/s dense bf16 per A100",
                    "agrees" if implied[0] <= S["mfu"][1] and implied[1] >= S["mfu"][0] else "differs"))
    mid = sum(S["mfu"]) / 2
    cost = papers / (a100.peak_flops * mid) / 3600 * S["price"]
    cost_days = S["cost_usd"] / S["price"] / S["gpus"] / 24
    rows.append(row("cost at $1 per A100-hour", S["cost_usd"], cost, "USD",
                    f"ours at {pct(mid)} MFU; $63M buys {cost_days:.0f} days of 25,000 A100s, i.e. "
                    f"{pct(papers / (cluster * cost_days * DAY))} MFU"))
    h100_mfu = papers / (S["h100_gpus"] * h100.peak_flops * S["h100_days"] * DAY)
    h100_days = papers / (S["h100_gpus"] * h100.peak_flops * mid) / DAY
    rows.append(row("8,192 H100 in ~55 days", S["h100_days"], h100_days, "days",
                    f"ours at {pct(mid)} MFU; 55 days needs {pct(h100_mfu)} of the bf16 peak "
                    f"({h100.peak_flops / 1e12:.0f} TFLOP/s), or {pct(h100_mfu / 2)} of FP8's 2x peak"))
    h100_cost = S["h100_gpus"] * S["h100_days"] * 24 * S["h100_price"]
    rows.append(row("cost of the H100 run at $2/hour", S["h100_cost_usd"], h100_cost, "USD",
                    f"8,192 x 55 days x 24 h x $2; at {pct(mid)} MFU it would be "
                    f"{money(h100_days * S['h100_gpus'] * 24 * S['h100_price'])}"))
    rows.append(row("batch tokens per expert (60M batch)", S["batch_tokens_per_expert"],
                    S["batch_tokens"] * cfg.active_experts / cfg.n_experts, "tokens",
                    f"60M x top-{cfg.active_experts} / {cfg.n_experts} experts; the batch is "
                    f"{S['batch_tokens'] / S['seq_len']:,.0f} sequences of {S['seq_len']:,}"))
    for claim, seed, part in (("the seed's training layout", "TP 8 x PP 15", lambda: layout_rows(r, a100)),
                              ("the seed's serving layout", "TP 8 x PP 16", lambda: serving_rows(r, a100, h100))):
        try:
            rows += part()
        except PlanError as err:  # a model too small for the seed's layouts (e.g. fewer than 16 layers)
            rows.append(row(claim, seed, "n/a", "", str(err), "n/a"))
    return {"rows": rows, "assumptions": {
        "training_gpu": a100.name, "training_gpus": S["gpus"], "tokens": S["tokens"], "seq_len_tokens": S["seq_len"],
        "batch_tokens": S["batch_tokens"], "price_usd_per_a100_hour": S["price"],
        "price_usd_per_h100_hour": S["h100_price"], "serving_context_tokens": S["serve_context"]}}


def layout_rows(r: PlanRequest, a100) -> List[dict]:
    S, cfg = SEED, r.model
    unit = S["tp"] * S["pp"]
    gpus = S["gpus"] // unit * unit
    dp = gpus // unit
    base = replace(r.workload(a100, 8), seq_len=S["seq_len"], batch_tokens=int(S["batch_tokens"]), microbatches=None)
    fits = {}
    for ep in [e for e in (1, 2, 4, 8, 16, 32, 64) if cfg.n_experts % e == 0 and dp % e == 0]:
        best, leanest = best_variant(base, S["tp"], S["pp"], ep, dp)
        fits[ep] = (best, leanest)
    first_fit = next((ep for ep, (b, _) in fits.items() if b is not None), None)
    lean1 = fits[1][1]
    note = (f"25,000 is not a multiple of {unit}: the layout runs on {gpus:,} (dp {dp}), {S['gpus'] - gpus} idle. "
            f"With ZeRO-1 alone (ep 1) a GPU needs {gib(lean1.memory.total_bytes):.0f} GiB at best "
            f"({lean1.layout.variant}) > {gib(base.usable_bytes):.0f} GiB usable")
    if first_fit is None:
        return [row("TP 8 x PP 15, ZeRO-1, on 40 GB A100s", "fits", "does not fit", "",
                    note + "; no expert-parallel degree fixes it", "differs")]
    best = fits[first_fit][0]
    note += (f"; it fits with expert parallelism ep {first_fit} ({best.layout.variant}): "
             f"{gib(best.memory.total_bytes):.1f} GiB")
    fastest = max((b for b, _ in fits.values() if b is not None), key=lambda c: c.step.modeled_mfu)
    a80 = replace(base, accelerator=get_accelerator("a100-80gb", r.catalogue))
    on80 = best_variant(a80, S["tp"], S["pp"], 1, dp)[0]
    if on80 is not None:
        note += f"; on 80 GB A100s ep 1 fits ({gib(on80.memory.total_bytes):.0f} GiB)"
    rows = [row("TP 8 x PP 15, ZeRO-1, on 40 GB A100s", "fits", f"fits only with ep >= {first_fit}" if first_fit > 1
                else "fits", "", note, "agrees" if first_fit == 1 else "needs expert parallelism")]
    rows.append(row("MFU of that layout (step model, no failures)", "32%-36%", pct(fastest.step.modeled_mfu), "",
                    f"the fastest fitting expert-parallel degree: {fastest.layout.label}, {fastest.step.microbatches} "
                    f"microbatches of {fastest.layout.micro_batch_size}, bubble "
                    f"{pct(fastest.step.bubble_s / fastest.step.step_s)} of the step", ""))
    return rows


def serving_rows(r: PlanRequest, a100, h100) -> List[dict]:
    S, cfg = SEED, r.model
    ctx = min(S["serve_context"], cfg.max_seq_len)
    a = ServePlan(ServeSetup(cfg, a100, S["serve_tp"], S["serve_pp"], ctx, S["price"]))
    ranks = pipeline_ranks(cfg, S["serve_pp"])
    per_node = max(rank_params(cfg, 1, 1, rk, S["serve_pp"]).total for rk in ranks)
    layers = sorted({rk.layers for rk in ranks})
    rows = [row("parameters per 8-GPU node (TP 8 x PP 16)", S["params_per_node"], per_node, "params",
                f"{cfg.n_layers} layers over 16 stages: {' or '.join(map(str, layers))} per stage")]
    for name, acc, price, seed_cost in (("A100", a100, S["price"], S["serve_cost_a100"]),
                                        ("H100", h100, S["h100_price"], S["serve_cost_h100"])):
        p = a if acc is a100 else ServePlan(ServeSetup(cfg, acc, S["serve_tp"], S["serve_pp"], ctx, price))
        batch = p.max_batch()
        point = p.decode(max(1, batch))
        holds = p.context_for_cost(seed_cost)
        note = (f"full batch of {batch} at {ctx:,} tokens, {point.tokens_per_s:,.0f} tokens/s, decode only, "
                f"${price:g}/GPU-hour; ")
        note += (f"the seed's figure holds if sequences average <= {holds:,} tokens of context"
                 if holds else "the seed's figure holds at no context length")
        rows.append(row(f"cost per 1k tokens, 128 {name}s at 8k", seed_cost, point.cost_usd_per_1k_tokens, "USD",
                        note + (" (the seed says 'cents': read as dollars)" if name == "A100" else "")))
    b32 = a.max_batch(32768)
    rows.append(row("32k context cannot run on 40 GB A100s", "cannot run",
                    f"runs, batch <= {b32}" if b32 >= 1 else "cannot run", "",
                    f"MQA keeps the KV cache at {a.kv_bytes_per_token_per_gpu:,} bytes per token per GPU; "
                    f"{gib(a.free_bytes_per_gpu):.1f} GiB free after the weights",
                    "differs" if b32 >= 1 else "agrees"))
    rows.append(row("8k context is capped on batch size", "capped", f"batch <= {a.max_batch(ctx)}", "",
                    f"{a.kv_capacity_tokens:,} tokens of KV cache fit in the 128-GPU cluster", "agrees"))
    return rows
