"""Accelerators the planner knows: datasheet figures, each with its source.

Conventions (every entry follows them, and a YAML extension must too):
- `peak_flops`: dense (no 2:4 sparsity) bf16 tensor-core FLOP/s of one device.
  MFU is measured against it (PaLM's definition), so the trainer reads it too,
  through `peak_flops()`, where `cluster.peak_flops` overrides it.
- `memory_gib`: the datasheet's "GB" of HBM, which is binary in practice
  (nvidia-smi shows 81,920 MiB on an A100-80GB and 143,771 MiB on an H200).
- bandwidths are bytes/s of ONE device in ONE direction: NVLink datasheets
  add both directions (A100 "600 GB/s" = 300 GB/s each way), network figures
  are the node's NICs divided by its 8 GPUs (DGX A100: 8 x 200 Gb/s HDR).
- `matmul_efficiency`: the share of peak a large bf16 GEMM reaches, used only
  by the step-time and decode models (H200: ~784 of 989 TFLOP/s measured on
  our own lent machine, see DESIGN.md; 0.8 elsewhere, the same ballpark; cpu:
  a 1024^2 float32 matmul on one core of our CI machine ran at 128 GFLOP/s).
- `price_per_gpu_hour`: USD per device-hour, an ASSUMPTION, not a datasheet
  figure: a round typical on-demand list price of late 2026, for a plan whose
  config and flags name no price. `cluster.price_per_gpu_hour` and
  `--price-per-gpu-hour` win over it; the report says when it was used.

The "cpu" entry is NOMINAL, so that CPU test runs report an MFU at all: one
Ray CPU worker ~ one core with two AVX-512 FMA units at ~3 GHz (2 x 16 lanes x
2 FLOP x 3e9 = ~1.9e11 FLOP/s float32). Set `cluster.peak_flops` to your own.

Extend with `moray plan --accelerators FILE.yaml`:

    accelerators:
      h100-nvl:                       # a new name, or an existing one to override
        base: h100-80gb               # optional: start from an entry, change some fields
        memory_gib: 94
        memory_bandwidth_gb_per_s: 3900
        source: "NVIDIA H100 NVL product brief"

Keys: peak_tflops, memory_gib, memory_bandwidth_gb_per_s, intra_node_gb_per_s,
inter_node_gb_per_s, source (all required without `base`), matmul_efficiency
(default 0.8), price_per_gpu_hour (default none).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Dict, Mapping, Optional

from moray.platform.planner.errors import PlanError

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16 FLOP/s (float32 for "cpu")
    memory_gib: float
    memory_bandwidth: float  # bytes/s, HBM
    intra_node_bandwidth: float  # bytes/s per device per direction (NVLink / Infinity Fabric)
    inter_node_bandwidth: float  # bytes/s per device per direction (InfiniBand / RoCE)
    matmul_efficiency: float
    source: str
    price_per_gpu_hour: Optional[float] = None  # USD, assumed (see the module docstring); None: unknown

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "peak_flops": self.peak_flops,
            "memory_bytes": self.memory_bytes,
            "memory_bandwidth_bytes_per_s": self.memory_bandwidth,
            "intra_node_bytes_per_s": self.intra_node_bandwidth,
            "inter_node_bytes_per_s": self.inter_node_bandwidth,
            "matmul_efficiency": self.matmul_efficiency,
            "source": self.source,
            "price_usd_per_gpu_hour": self.price_per_gpu_hour,
        }


def _acc(name, tflops, gib, hbm_gbs, intra_gbs, inter_gbs, source, eff=0.8, price=None) -> Accelerator:
    return Accelerator(name, tflops * 1e12, gib, hbm_gbs * GB, intra_gbs * GB, inter_gbs * GB, eff, source, price)


_A100 = ("NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16 312 TFLOPS dense, "
         "NVLink 600 GB/s; DGX A100: 8x 200 Gb/s HDR InfiniBand")
_H100 = ("NVIDIA H100 datasheet (SXM): BF16 1,979 TFLOPS with sparsity = 989 dense, 3.35 TB/s, "
         "NVLink 900 GB/s; DGX H100: 8x 400 Gb/s NDR")

# `price=`: assumed on-demand USD per GPU-hour, round figures from cloud list prices of late 2026
# (not datasheets; see the module docstring). The nominal cpu worker has none.
BUILTIN: Mapping[str, Accelerator] = {
    a.name: a
    for a in (
        _acc("a100-40gb", 312, 40, 1555, 300, 25, _A100 + "; 40 GB HBM2 at 1,555 GB/s", price=1.5),
        _acc("a100-80gb", 312, 80, 2039, 300, 25, _A100 + "; 80 GB HBM2e at 2,039 GB/s", price=2.0),
        _acc("h100-80gb", 989, 80, 3350, 450, 50, _H100 + "; 80 GB HBM3", price=3.0),
        _acc("h200", 989, 141, 4800, 450, 50,
             "NVIDIA H200 datasheet (SXM): BF16 989 TFLOPS dense, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s",
             eff=0.79, price=3.5),
        _acc("b200", 2250, 180, 8000, 900, 50,
             "NVIDIA HGX B200 spec (1,000 W): BF16 4.5 PFLOPS with sparsity = 2.25 dense, 180 GB HBM3e at "
             "8 TB/s, NVLink 5 1.8 TB/s; DGX B200: 8x 400 Gb/s", price=5.0),
        _acc("mi300x", 1307.4, 192, 5300, 448, 50,
             "AMD Instinct MI300X data sheet: BF16 1,307.4 TFLOPS dense, 192 GB HBM3 at 5.3 TB/s, "
             "Infinity Fabric 896 GB/s aggregate peer bandwidth", price=2.5),
        _acc("cpu", 0.192, 16, 20, 10, 12.5,
             "nominal, not a datasheet: one Ray CPU worker ~ one AVX-512 core (2 FMA x 16 lanes x 2 x 3 GHz), "
             "16 GiB, 20 GB/s DRAM, 10 GB/s gloo in a node, 100 GbE between nodes; override cluster.peak_flops",
             eff=0.65),
    )
}

_YAML_KEYS = {  # YAML key -> (field, scale to the field's unit)
    "peak_tflops": ("peak_flops", 1e12),
    "memory_gib": ("memory_gib", 1.0),
    "memory_bandwidth_gb_per_s": ("memory_bandwidth", GB),
    "intra_node_gb_per_s": ("intra_node_bandwidth", GB),
    "inter_node_gb_per_s": ("inter_node_bandwidth", GB),
    "matmul_efficiency": ("matmul_efficiency", 1.0),
    "price_per_gpu_hour": ("price_per_gpu_hour", 1.0),
    "source": ("source", None),
}


def load_catalogue(path: Optional[str | Path] = None) -> Dict[str, Accelerator]:
    """The built-in catalogue, plus (and overridden by) the entries of a YAML file."""
    catalogue = dict(BUILTIN)
    if path is None:
        return catalogue
    import yaml  # only when a file is given

    p = Path(path)
    if not p.exists():
        raise PlanError(f"accelerator file {p} not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise PlanError(f"{p}: not valid YAML: {err}") from None
    entries = raw.get("accelerators") if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise PlanError(f"{p}: expected a mapping 'accelerators: {{name: {{peak_tflops: ..., ...}}}}'")
    for name, spec in entries.items():
        catalogue[str(name).lower()] = _from_yaml(str(name).lower(), spec, catalogue, p)
    return catalogue


def _from_yaml(name: str, spec: object, catalogue: Mapping[str, Accelerator], path: Path) -> Accelerator:
    where = f"{path}: accelerators.{name}"
    if not isinstance(spec, dict):
        raise PlanError(f"{where}: expected a mapping of {', '.join(_YAML_KEYS)}")
    spec = dict(spec)
    base_name = spec.pop("base", None)
    unknown = sorted(set(spec) - set(_YAML_KEYS))
    if unknown:
        raise PlanError(f"{where}: unknown keys {unknown}; allowed: base, {', '.join(_YAML_KEYS)}")
    values = {}
    for key, value in spec.items():
        field, scale = _YAML_KEYS[key]
        if scale is None:
            values[field] = str(value)
            continue
        if not isinstance(value, (int, float)) or value <= 0:
            raise PlanError(f"{where}.{key}: expected a positive number (got {value!r})")
        values[field] = float(value) * scale
    if base_name is not None:
        base = get_accelerator(str(base_name), catalogue)
        values.setdefault("source", f"{base.source} (modified in {path.name})")
        return replace(base, name=name, **values)
    missing = [k for k, (f, _) in _YAML_KEYS.items()
               if f not in values and k not in ("matmul_efficiency", "price_per_gpu_hour")]
    if missing:
        raise PlanError(f"{where}: missing {missing} (or give 'base: <known accelerator>' to start from one)")
    values.setdefault("matmul_efficiency", 0.8)
    known = {f.name for f in fields(Accelerator)}
    return Accelerator(name=name, **{k: v for k, v in values.items() if k in known})


def get_accelerator(name: str, catalogue: Optional[Mapping[str, Accelerator]] = None) -> Accelerator:
    catalogue = BUILTIN if catalogue is None else catalogue
    key = name.lower()
    if key in catalogue:
        return catalogue[key]
    close = difflib.get_close_matches(key, list(catalogue), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise PlanError(
        f"unknown accelerator {name!r}{hint}; known: {', '.join(sorted(catalogue))}. "
        "Add it with --accelerators FILE.yaml, or set cluster.peak_flops for MFU alone"
    )


def peak_flops(name: str, override: Optional[float] = None,
               catalogue: Optional[Mapping[str, Accelerator]] = None) -> float:
    """Dense peak FLOP/s of one device for MFU: `cluster.peak_flops` if set, else the catalogue's."""
    if override is not None:
        if override <= 0:
            raise PlanError(f"cluster.peak_flops must be positive (got {override})")
        return float(override)
    return get_accelerator(name, catalogue).peak_flops
