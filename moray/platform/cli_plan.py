"""`moray plan`: how much compute does this model really take, to train and to serve?

    moray plan --config configs/gpt4.yaml --gpus 24960 --tokens 13T
    moray plan --config configs/mixtral-8x7b.yaml --gpu h100-80gb --gpus 512 --mfu 0.45 --json
    moray plan --config configs/gpt4.yaml --gpus 24960 --tokens 13T --plot plan.png

Every input comes from a flag, else the config (`cluster.gpu`,
`cluster.gpus_per_node`, `cluster.price_per_gpu_hour`, `cluster.peak_flops`,
`train.*`, `parallel.*`), else a default the report names. What the file
leaves out of a training run is planned, not taken from the trainer's CPU-test
defaults (planner/defaults.py): 20 tokens per active parameter (Chinchilla)
unless it sets train.max_steps or a batch, model.max_seq_len up to 8k, bf16,
DeepSeek LLM's batch for that compute, the catalogue's assumed price per
GPU-hour. Each such figure says so in the report. Sections: model,
training, memory (the configured layout; when it cannot run on the cluster,
why, and the best layout that can, which the days are then for), layouts (all
feasible ones), inference, goodput, seed_check; `--json` prints them as one
object, keys in snake_case with units in the name. A section that cannot be
computed for this request says why in its place (`{"error": ...}`); the exit
code is 2 only for a malformed request (bad YAML, an unknown key or
accelerator, a count below 1). Imports neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from moray.platform.config import ConfigError, load_config
from moray.platform.planner.errors import PlanError
from moray.platform.planner.plan import build_plan, resolve_request, sections
from moray.platform.planner.report import render_plan

USER_ERRORS = (ConfigError, PlanError)
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_count(text: str) -> float:
    """'13T', '300B', '1.5e12', '60M' -> a number."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgtp]?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count; write e.g. 13T, 300B, 1.5e12")
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="capacity planner: parameters, FLOPs, memory, layouts, days, cost, serving",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="a moray YAML config (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    g = p.add_argument_group("cluster")
    g.add_argument("--gpu", help="accelerator name (default cluster.gpu); see --accelerators")
    g.add_argument("--gpus", type=int, help="GPUs for training (default: cluster.num_workers, else the fewest "
                                            "on which the configured layout fits)")
    g.add_argument("--gpus-per-node", type=int, help="default cluster.gpus_per_node")
    g.add_argument("--price-per-gpu-hour", type=float, metavar="USD",
                   help="default cluster.price_per_gpu_hour, else the catalogue's assumed list price")
    g.add_argument("--accelerators", metavar="FILE.yaml", help="extra or changed accelerators (catalogue.py)")
    g.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of a GPU's memory tensors may fill (default 0.9)")
    g = p.add_argument_group("training")
    g.add_argument("--tokens", type=parse_count, help="training tokens, e.g. 13T (default: train.max_steps x batch "
                   "if the file sets either, else 20 x active parameters, Chinchilla)")
    g.add_argument("--mfu", type=float, help="model FLOPs utilisation to assume, e.g. 0.35 (default 0.40)")
    g.add_argument("--days", type=float, help="a training duration: report the MFU it implies")
    g = p.add_argument_group("inference")
    g.add_argument("--serve-gpu", help="accelerator for serving (default: --gpu)")
    g.add_argument("--serve-tp", type=int, help="tensor parallel degree of a serving replica")
    g.add_argument("--serve-pp", type=int, help="pipeline stages of a serving replica")
    g.add_argument("--context", type=int, help="tokens per sequence in the KV cache (default model.max_seq_len)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    g.add_argument("--plot", metavar="FILE.png", help="also draw training days and cost against cluster size")
    g.add_argument("--no-seed-check", action="store_true", help="leave out the seed's GPT-4 claims")
    for section in sections():
        if section.add_arguments is not None:
            section.add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    request = resolve_request(
        config, gpu=args.gpu, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
        price_per_gpu_hour=args.price_per_gpu_hour, mfu=args.mfu, tokens=args.tokens, days=args.days,
        accelerators=args.accelerators, serve_gpu=args.serve_gpu, serve_tp=args.serve_tp, serve_pp=args.serve_pp,
        context=args.context, usable_fraction=args.memory_fraction, seed_check=not args.no_seed_check,
        options=vars(args),
    )
    plan = build_plan(request)
    title = (f"moray plan: {args.config}" + "".join(f" --set {s}" for s in args.set)
             + f" on {request.gpus:,} x {request.accelerator.name}")
    if args.plot:
        from moray.platform.planner.plot import write_plot

        write_plot(request, plan, args.plot, title)
    if args.json:
        json.dump(plan, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_plan(plan, title))
        if args.plot:
            sys.stdout.write(f"\nplot: {args.plot}\n")
    return 0


def main() -> int:
    from moray.platform.cli import main as moray_main

    return moray_main(["plan"] + sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
