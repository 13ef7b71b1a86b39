"""`--plot FILE.png`: training days and cost against cluster size.

Two curves per panel: at the assumed MFU (days fall as 1/GPUs, cost stays
flat) and at the best layout the step model finds on each cluster size (with
the global batch fixed, more GPUs mean fewer microbatches per data-parallel
rank and a larger pipeline bubble, so cost rises at scale). Matplotlib, Agg
backend, imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from moray.platform.planner.layouts import search_layouts
from moray.platform.planner.plan import PlanRequest
from moray.platform.planner.units import count

DAY = 86400.0


def cluster_sizes(gpus: int, per_node: int) -> List[int]:
    sizes = {gpus}
    for k in range(-6, 3):
        n = int(gpus * 2.0**k) // per_node * per_node if gpus * 2.0**k >= per_node else int(gpus * 2.0**k)
        if n >= 1:
            sizes.add(n)
    return sorted(sizes)


def curves(r: PlanRequest, plan: Dict[str, dict]) -> Dict[str, list]:
    t = plan["training"]
    w = r.workload()
    price = r.price_per_gpu_hour or 0.0
    out: Dict[str, list] = {"gpus": [], "days": [], "cost_usd": [], "fits": [], "modelled_gpus": [],
                            "modelled_days": [], "modelled_cost_usd": [], "modelled_mfu": []}
    for n in cluster_sizes(r.gpus, r.gpus_per_node):
        days = t["training_flops_with_attention"] / (n * r.accelerator.peak_flops * r.mfu) / DAY
        out["gpus"].append(n)
        out["days"].append(days)
        out["cost_usd"].append(days * 24 * n * price)
        best = search_layouts(w, n).feasible
        out["fits"].append(bool(best))
        if best:
            step = best[0].step
            mdays = r.tokens / step.tokens_per_s / DAY
            out["modelled_gpus"].append(n)
            out["modelled_days"].append(mdays)
            out["modelled_cost_usd"].append(mdays * 24 * n * price)
            out["modelled_mfu"].append(step.modeled_mfu)
    return out


def write_plot(r: PlanRequest, plan: Dict[str, dict], path: str, title: str) -> Dict[str, list]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    data = curves(r, plan)
    fig, (ax_days, ax_cost) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    gpus, fits = data["gpus"], data["fits"]
    costs = [c / 1e6 for c in data["cost_usd"]]
    assumed = f"at {r.mfu:.0%} MFU (assumed)"
    ax_days.loglog(gpus, data["days"], "-", color="tab:blue", alpha=0.5)
    ax_cost.semilogx(gpus, costs, "-", color="tab:blue", alpha=0.5)
    for ax, ys in ((ax_days, data["days"]), (ax_cost, costs)):
        ax.plot([g for g, f in zip(gpus, fits) if f], [y for y, f in zip(ys, fits) if f], "o", color="tab:blue",
                label=assumed)
        if not all(fits):
            ax.plot([g for g, f in zip(gpus, fits) if not f], [y for y, f in zip(ys, fits) if not f], "x",
                    color="grey", label="no layout fits the model")
    if data["modelled_gpus"]:
        label = "best layout, step model (no failures)"
        ax_days.loglog(data["modelled_gpus"], data["modelled_days"], "s--", color="tab:orange", label=label)
        ax_cost.semilogx(data["modelled_gpus"], [c / 1e6 for c in data["modelled_cost_usd"]], "s--",
                         color="tab:orange", label=label)
        for n, c, m in zip(data["modelled_gpus"], data["modelled_cost_usd"], data["modelled_mfu"]):
            ax_cost.annotate(f"{m:.0%}", (n, c / 1e6), textcoords="offset points", xytext=(0, 6),
                             ha="center", fontsize=8, color="tab:orange")
    plain = FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x >= 1000 else f"{x:g}")
    for ax in (ax_days, ax_cost):
        ax.axvline(r.gpus, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"this plan: {r.gpus:,}", (r.gpus, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                    fontsize=8, color="grey", ha="right", va="bottom")
        ax.xaxis.set_major_formatter(plain)
        ax.set_xlabel(f"GPUs ({r.accelerator.name})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9)
    ax_days.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax_days.set_ylabel("training days")
    tokens = plan["training"]["tokens"]
    ax_days.set_title(f"days to train on {count(tokens)} tokens")
    price = r.price_per_gpu_hour
    ax_cost.set_ylabel("cost, million USD" + (f" at ${price:g}/GPU-hour" if price else " (no price given)")
                       + (" (assumed)" if price and r.price_assumed else ""))
    ax_cost.set_title("cost (labels: modelled MFU)")
    tallest = max(costs + [c / 1e6 for c in data["modelled_cost_usd"]] + [0])
    ax_cost.set_ylim(0, tallest * 1.15 or 1)
    fig.suptitle(title, fontsize=11)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return data
