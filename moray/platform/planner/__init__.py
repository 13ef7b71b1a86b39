"""The capacity planner: how much compute does a model really take, to train and to serve?

Pure Python on top of the config dataclasses: no torch, no Ray, no GPU.

    from moray.platform.planner import estimate_memory, flops_per_token, peak_flops, pipeline_bubble

Modules: catalogue (accelerators), flops, memory (per-rank bytes), activations, steptime,
layouts (check and search), inference, seed_check, plan (request + sections), defaults
(what a plan assumes where the config file is silent), sections, report (human text), plot.
`moray plan` is moray.platform.cli_plan.
"""

from moray.platform.planner.catalogue import Accelerator, get_accelerator, load_catalogue, peak_flops
from moray.platform.planner.errors import PlanError
from moray.platform.planner.flops import (attention_flops_per_token, flops_per_token, mfu, pipeline_bubble,
                                          training_flops, training_flops_with_attention)
from moray.platform.planner.inference import kv_cache_bytes_per_token
from moray.platform.planner.layouts import check_layout, search_layouts
from moray.platform.planner.activations import layer_activation_bytes
from moray.platform.planner.memory import (MemoryEstimate, estimate_memory, estimate_memory_per_stage,
                                           pipeline_ranks, stage_layer_counts)
from moray.platform.planner.plan import PlanRequest, Section, build_plan, resolve_request
from moray.platform.planner.workload import Workload

__all__ = [
    "Accelerator", "get_accelerator", "load_catalogue", "peak_flops", "PlanError",
    "attention_flops_per_token", "flops_per_token", "mfu", "pipeline_bubble", "training_flops",
    "training_flops_with_attention", "kv_cache_bytes_per_token", "check_layout", "search_layouts",
    "MemoryEstimate", "estimate_memory", "estimate_memory_per_stage", "layer_activation_bytes", "pipeline_ranks",
    "stage_layer_counts", "PlanRequest", "Section", "build_plan", "resolve_request", "Workload",
]
