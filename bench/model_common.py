"""Shared by the model benchmarks and GPU checks: presets without pydantic, FLOPs, peaks, HF twins.

The GPU machine has torch, transformers and safetensors but no pydantic and
maybe no pyyaml, so presets are read with pyyaml when present and otherwise
with `read_simple_yaml`, a reader for the subset our presets use (nested
mappings, scalars, comments); tests/test_bench_common.py checks both agree.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moray.model import ModelConfig, count_params  # noqa: E402


def _scalar(text: str) -> Any:
    t = text.strip()
    if t in ("null", "~", ""):
        return None
    if t in ("true", "false"):
        return t == "true"
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    if re.fullmatch(r"[-+]?\d+", t):
        return int(t)
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", t):
        return float(t)
    return t


def read_simple_yaml(text: str) -> Dict[str, Any]:
    """Nested block mappings of scalars, `#` comments: enough for configs/*.yaml."""
    root: Dict[str, Any] = {}
    stack = [(-1, root)]
    for raw in text.splitlines():
        line = re.sub(r"\s+#.*$", "", raw) if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        key, sep, value = line.strip().partition(":")
        if not sep or line.strip().startswith(("-", "{", "[")):
            raise ValueError(f"read_simple_yaml: unsupported line {raw!r}; install pyyaml")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if value.strip():
            parent[key] = _scalar(value)
        else:
            parent[key] = {}
            stack.append((indent, parent[key]))
    return root


def load_preset(path: str | Path) -> Dict[str, Any]:
    text = Path(path).read_text()
    try:
        import yaml
    except ImportError:
        return read_simple_yaml(text)
    return yaml.safe_load(text) or {}


def model_config(path: str | Path) -> Tuple[ModelConfig, Dict[str, Any]]:
    """(ModelConfig, train section) of a preset, validated by ModelConfig.from_dict."""
    raw = load_preset(path)
    return ModelConfig.from_dict(raw["model"]), raw.get("train") or {}


# ---------------------------------------------------------------- FLOPs and peaks


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> Dict[str, float]:
    """PaLM's model FLOPs (Chowdhery et al. 2022, app. B), with N = active parameters:

        6 * N_active                       matmuls, forward (2) + backward (4) per parameter
      + 12 * n_layers * n_heads * head_dim * seq_len    attention scores and values, full square

    N_active is count_params().active (including the input embedding, as the
    issue's 0.6B for bench-moe does). Masked-out causal halves are counted, as
    PaLM does, so MFU compares with published numbers.
    """
    n_active = count_params(cfg).active
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return {"params_term": 6.0 * n_active, "attention_term": float(attention),
            "total": 6.0 * n_active + attention, "n_active": n_active}


DATASHEET_BF16_DENSE_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}


def device_peak_tflops(device: torch.device, dtype: torch.dtype, override: Optional[float]) -> Tuple[float, str]:
    """(peak TFLOP/s, where it comes from): the flag, the datasheet, or a measured CPU matmul."""
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in DATASHEET_BF16_DENSE_TFLOPS.items():
            if key in name:
                return peak, f"{key} bf16 dense datasheet"
        raise SystemExit(f"no datasheet peak for {name!r}; pass --peak-tflops")
    return measure_matmul_tflops(device, dtype), f"measured {dtype} matmul on this CPU"


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 8) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> Dict[str, Any]:
    info = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg_1m": os.getloadavg()[0]}  # other work on a shared CPU skews wall-clock times
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------- the Hugging Face twin


def hf_twin(cfg: ModelConfig, state_dict, device: torch.device, dtype: torch.dtype,
            experts_implementation: Optional[str] = None):
    """MixtralForCausalLM with our weights, built in memory (no disk) on `device`.

    experts_implementation: None keeps transformers' default (grouped_mm where it can);
    "eager" is its per-expert loop, the safe float32 reference on any device."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from moray.model.hf import config_to_hf, to_hf_module_state

    hf_cfg = MixtralConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"})
    with torch.device(device):
        hf = MixtralForCausalLM(hf_cfg).to(dtype)
    hf.load_state_dict(to_hf_module_state(cfg, state_dict, hf.state_dict().keys()))
    if experts_implementation and hasattr(hf, "set_experts_implementation"):
        hf.set_experts_implementation(experts_implementation)
    return hf
