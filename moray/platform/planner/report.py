"""The human report: one renderer per section, plain aligned text."""

from __future__ import annotations

import re
import textwrap
from typing import Dict, List, Sequence

from moray.platform.planner.units import count, gib, money, num, pct, sci, si

WIDTH = 100


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> List[str]:
    """Columns right-aligned except the first."""
    cells = [list(headers)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(cells[0]), indent + "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]


def pairs(items: Sequence[tuple], indent: str = "  ") -> List[str]:
    width = max(len(k) for k, _ in items)
    return [f"{indent}{k.ljust(width)}  {v}" for k, v in items]


def heading(text: str) -> List[str]:
    return ["", text, "=" * len(text)]


def render_model(m: dict) -> List[str]:
    moe = f"top-{m['top_k']} of {m['n_experts']} experts" if m["n_experts"] > 1 else "dense"
    return heading("Model") + pairs([
        ("total parameters", f"{count(m['total_params'])}  (embedding {count(m['embedding_params'])}, attention "
                             f"{count(m['attention_params'])}, experts {count(m['expert_params'])}, router "
                             f"{count(m['router_params'])}, norms {count(m['norm_params'])})"),
        ("active per token", f"{count(m['active_params'])}  ({pct(m['active_share'])} of total; {moe}; "
                             f"{count(m['params_per_expert'])} per expert over {m['n_layers']} layers)"),
        ("forward FLOPs per token", f"{si(m['forward_flops_per_token'], 'FLOP')} at {m['seq_len_tokens']:,} tokens "
                                    + ("(assumed, see Training) " if m.get("seq_len_assumed") else "")
                                    + f"= {si(m['forward_matmul_flops_per_token'], 'FLOP')} (2 x active) + "
                                    f"{si(m['forward_attention_flops_per_token'], 'FLOP')} attention scores"),
        ("  a dense model this size", si(m["dense_equivalent_forward_flops_per_token"], "FLOP")),
        ("KV cache per token", f"{m['kv_cache_bytes_per_token']:,} bytes ({m['kv_cache_dtype']} values, serve.dtype)"),
    ])


def render_training(t: dict) -> List[str]:
    lines = heading(f"Training: {count(t['tokens'])} tokens on {t['gpus']:,} x {t['accelerator']} at "
                    f"{pct(t['mfu'])} MFU")
    idle = t["cluster_gpus"] - t["gpus"]
    layout = (f"{t['layout']} (as configured)" if t["layout_as_configured"] else
              f"{t['layout']}, {t['layout_source']}; the days are for it (see Memory)" if t["layout"] else
              f"{t['layout_source']}: the days count all {t['cluster_gpus']:,} as if one did (see Memory)")
    cost = "n/a: pass --price-per-gpu-hour"
    if t["cost_usd"] is not None:
        cost = (f"{money(t['cost_usd'])}  (6ND: {money(t['cost_usd_6nd'])}) at ${t['price_usd_per_gpu_hour']:g}"
                "/GPU-hour" + (f" ({t['price_assumed']})" if t.get("price_assumed") else ""))
    items = [
        ("GPUs", f"{t['gpus']:,}  ({t['gpus_source']})" + (f"; {idle:,} of {t['cluster_gpus']:,} idle" if idle else "")),
        ("layout", layout),
        ("tokens", f"{count(t['tokens'])}  ({t['tokens_source']})"),
    ] + ([("sequence length", f"{t['seq_len_tokens']:,} tokens  ({t['seq_len_assumed']})")]
         if t.get("seq_len_assumed") else []) + [
        ("training FLOPs (6ND)", sci(t["training_flops"])),
        ("  with attention scores", f"{sci(t['training_flops_with_attention'])}  "
                                    f"(+{pct(t['attention_share'] / (1 - t['attention_share']))})"),
        ("cluster peak", f"{si(t['cluster_peak_flops'], 'FLOP/s')} ({si(t['peak_flops_per_gpu'], 'FLOP/s')} per GPU)"),
        ("MFU", f"{pct(t['mfu'])}  ({t['mfu_source']}; PaLM's definition: attention counted)"),
        ("GPU-hours", f"{num(t['gpu_hours'])}  (6ND: {num(t['gpu_hours_6nd'])})"),
        ("days", f"{num(t['days'])}  (6ND: {num(t['days_6nd'])})"),
        ("cost", cost),
    ]
    if t.get("implied_mfu") is not None:
        items.append((f"MFU implied by {t['given_days']:g} days",
                      f"{pct(t['implied_mfu'])}  (6ND: {pct(t['implied_mfu_6nd'])})"))
    if t.get("batch_tokens"):
        per_expert = t.get("batch_tokens_per_expert")
        items.append(("batch", f"{t['batch_tokens']:,} tokens = {t['batch_sequences']:,.0f} sequences"
                               + (f"; {per_expert:,.0f} tokens per expert" if per_expert else "")
                               + (f"  ({t['batch_assumed']})" if t.get("batch_assumed") else "")))
    return lines + pairs(items)


def _variant(lay: dict) -> str:
    extras = ["activation checkpointing"] * lay["activation_checkpointing"] \
        + ["sequence parallelism"] * lay["sequence_parallel"]
    return ", ".join([f"micro-batch {lay['micro_batch_size']}"] + extras)


def _line(label: str, text: str, wrap: bool = True) -> List[str]:
    """A pairs() line with a 15-character label; a long explanation wraps under itself."""
    first = f"  {label.ljust(15)}  "
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=" " * len(first)) if wrap else [first + text]


def render_memory(m: dict) -> List[str]:
    lay, conf, chosen = m["layout"], m["configured"], m["chosen"]
    shape = f"tp {conf['tp']} x pp {conf['pp']} x ep {conf['ep']}"
    if conf.get("etp", conf["tp"]) != conf["tp"]:
        shape += f" (etp {conf['etp']})"
    usable = f"{gib(m['usable_bytes_per_gpu']):.1f} GiB usable of a {gib(m['memory_bytes_per_gpu']):.0f} GiB card"
    etp = f" (etp {lay['etp']})" if lay and lay.get("etp", lay["tp"]) != lay["tp"] else ""
    title = (f"Memory per GPU: tp {lay['tp']} x pp {lay['pp']} x ep {lay['ep']}{etp} x dp {lay['dp']} ({lay['gpus']:,} "
             f"GPUs), {m['dtype']}, {m['bytes_per_param']} bytes per parameter before ZeRO-{lay['zero']}" if lay else
             f"Memory per GPU: {shape} on {conf['gpus']:,} GPUs, {m['dtype']}: no layout fits")
    if conf["dp"] is None:
        as_configured = f"{shape} on {conf['gpus']:,} GPUs: not runnable"
    else:
        status = "fits" if conf["fits"] else "does NOT fit"
        as_configured = ("" if conf["runnable"] else f"{conf['label']}, ") + (
            f"{_variant(conf)}: {gib(conf['bytes_per_gpu']):,.2f} GiB on stage {conf['stage']}, {status} ({usable})")
    lines = heading(title)
    if m.get("dtype_assumed"):
        lines += _line("dtype", f"{m['dtype']} ({m['dtype_assumed']})")
    lines += _line("as configured", as_configured, wrap=not conf["runnable"])
    if conf["problem"]:
        lines += _line("why not", conf["problem"])
    if chosen is None:
        lines += _line("runs instead", "nothing on this cluster; the training days assume it would")
    elif conf["runnable"] and not m["fits_as_configured"]:
        lines += _line("fits with", f"{_variant(chosen)}: {gib(chosen['bytes_per_gpu']):.2f} GiB (shown below)",
                       wrap=False)
    elif not conf["runnable"]:
        lines += _line("runs instead", f"{chosen['label']}, {_variant(chosen)}: {gib(chosen['bytes_per_gpu']):.2f} "
                                       f"GiB, {m['chosen_source']}; the training days are for it (shown below)")
    for alternative in m["alternatives"]:
        lines += _line("what would fit", alternative)
    if lay is None:
        return lines
    lines += _line("pipeline bubble", f"{pct(m['pipeline_bubble'])} = (p-1)/(m+p-1), {lay['microbatches']} "
                                      f"microbatches, {lay['schedule']}", wrap=False)
    rows = [[str(s["stage"]), str(s["layers"]), count(s["params"]), f"{gib(s['weights_bytes']):.2f}",
             f"{gib(s['grads_bytes']):.2f}", f"{gib(s['optimizer_bytes']):.2f}", f"{gib(s['activations_bytes']):.2f}",
             f"{gib(s['total_bytes']):.2f}"] for s in m["stages"]]
    lines += [""] + table(["stage", "layers", "params", "weights", "grads", "optimizer", "activations",
                           "total GiB"], rows)
    rows = [[f"ZeRO-{v['zero']}", "on" if v["activation_checkpointing"] else "off", f"{gib(v['optimizer_bytes']):.2f}",
             f"{gib(v['activations_bytes']):.2f}", f"{gib(v['bytes_per_gpu']):.2f}", "yes" if v["fits"] else "no"]
            for v in m["zero_and_checkpointing"]]
    return lines + [""] + table(["optimizer", "checkpointing", "optimizer GiB", "activations GiB", "total GiB",
                                 "fits"], rows)


def _shape(c: dict) -> str:
    """tp8 pp15 ep16 dp208, with etpN when the experts are split over fewer ranks than tp."""
    etp = f" etp{c['etp']}" if c.get("etp", c["tp"]) != c["tp"] else ""
    return f"tp{c['tp']} pp{c['pp']} ep{c['ep']}{etp} dp{c['dp']}"


def render_layouts(s: dict, top: int = 8) -> List[str]:
    lines = heading(f"Layouts on {s['gpus']:,} GPUs: {s['feasible_count']} feasible, ranked by modelled "
                    f"step time")
    rows = []
    for i, c in enumerate(s["feasible"][:top], 1):
        st = c["step"]
        extras = ("ckpt " if c["activation_checkpointing"] else "") + ("sp" if c["sequence_parallel"] else "")
        rows.append([str(i), _shape(c), str(c["micro_batch_size"]),
                     extras.strip() or "-", f"{gib(c['bytes_per_gpu']):.1f}", f"{st['step_s']:.3g}",
                     f"{st['tokens_per_s']:,.0f}", pct(st["bubble_s"] / st["step_s"]), pct(st["modeled_mfu"])])
    if rows:
        lines += table(["#", "layout", "mbs", "needs", "GiB/GPU", "step s", "tokens/s", "bubble", "model MFU"], rows)
        lines.append("  needs: ckpt = activation checkpointing, sp = sequence parallelism; "
                     "model MFU is an upper bound (no failures, no stragglers)")
        if any(c.get("etp", c["tp"]) != c["tp"] for c in s["feasible"][:top]):
            lines.append("  etp1: whole experts, each expert group ep consecutive ranks across tp x dp")
    kinds = ", ".join(f"{n} by {k}" for k, n in sorted(s["rejected_by_kind"].items()))
    lines.append(f"  rejected: {s['rejected_count']}" + (f" ({kinds})" if kinds else ""))
    near = sorted((x for x in s["rejected"] if x["kind"] == "memory"), key=lambda x: x["bytes_per_gpu"])[:3]
    templates = {}
    for rej in s["rejected"]:  # one example of each structural reason, numbers aside
        if rej["kind"] == "structure":
            templates.setdefault(re.sub(r"\d[\d,.]*", "#", rej["reason"]), rej)
    if near:
        lines.append("  closest misses on memory:")
    for rej in near + list(templates.values())[:4]:
        lines += textwrap.wrap(f"{_shape(rej)}: {rej['reason']}",
                               WIDTH, initial_indent="    - ", subsequent_indent="      ")
    return lines


def render_inference(s: dict) -> List[str]:
    lines = heading(f"Inference: tp {s['tp']} x pp {s['pp']} = {s['gpus']} x {s['accelerator']}, {s['dtype']}, "
                    f"context {s['context_tokens']:,} tokens")
    layers = sorted(set(s["layers_per_stage"]))
    lines += pairs([
        ("layout", s["layout_source"]),
        ("per stage", f"{'/'.join(map(str, layers))} layers, {count(s['params_per_stage'])} parameters"),
        ("weights per GPU", f"{count(s['params_per_gpu'])} parameters = {gib(s['weights_bytes_per_gpu']):.1f} GiB "
                            f"of {gib(s['usable_bytes_per_gpu']):.1f} GiB usable"),
        ("KV cache", f"{s['kv_cache_bytes_per_token']:,} bytes per token, {s['kv_cache_bytes_per_token_per_gpu']:,} "
                     f"on each GPU; room for {s['kv_cache_capacity_tokens']:,} tokens"),
        ("largest batch", f"{s['max_batch']:,} sequences at {s['context_tokens']:,} tokens"),
        ("compute ceiling", f"{s['compute_bound_tokens_per_s']:,.0f} tokens/s at the matmul efficiency"),
        ("expert routing", s.get("routing", "uniform")),
    ] + ([("price", f"${s['price_usd_per_gpu_hour']:g}/GPU-hour ({s['price_assumed']})")]
         if s.get("price_assumed") else []))
    rows = [[f"{d['batch']:,}", f"{d['memory_bound_s'] * 1e3:,.1f}", f"{d['compute_bound_s'] * 1e3:,.1f}", d["bound"],
             f"{d['experts_touched_per_layer']:.1f}", f"{d['tokens_per_s']:,.0f}",
             "n/a" if d["cost_usd_per_1k_tokens"] is None else f"${d['cost_usd_per_1k_tokens']:.4f}"]
            for d in s["decode"]]
    return lines + [""] + table(["batch", "memory ms", "compute ms", "bound", "experts/layer", "tokens/s",
                                 "per 1k tokens"], rows) + [
        "  one decode round: every sequence gains a token; decode only (prefill not counted)"]


def _value(v, unit: str) -> str:
    if isinstance(v, str) or v is None:
        return str(v)
    if unit == "params" or unit == "tokens":
        return count(v)
    if unit == "FLOP":
        return si(v, "FLOP") if v < 1e18 else sci(v)
    if unit == "USD":
        return f"${v:.4f}" if v < 1 else money(v)
    return f"{v:,.0f} {unit}".strip()


def render_seed_check(s: dict) -> List[str]:
    lines = heading("The seed, checked: its GPT-4 claims beside ours")
    for r in s["rows"]:
        lines.append(f"  {r['claim']}")
        lines.append(f"      seed {_value(r['seed'], r['unit'])}   ours {_value(r['ours'], r['unit'])}"
                     + (f"   [{r['verdict']}]" if r["verdict"] else ""))
        if r["note"]:
            lines += textwrap.wrap(r["note"], WIDTH, initial_indent="      ", subsequent_indent="      ")
    return lines


def render_plan(plan: Dict[str, dict], title: str) -> str:
    from moray.platform.planner.plan import sections

    lines = [title]
    for section in sections():
        if section.name not in plan:
            continue
        built = plan[section.name]
        lines += (heading(section.title) + _line("not computed", built["error"]) if "error" in built
                  else section.render(built))
    return "\n".join(lines) + "\n"
