"""Training checkpoint -> a Hugging Face Mixtral directory or a moray directory (`moray export`).

    export_checkpoint("runs/tiny", "out/tiny-hf")                      # latest step, hub format
    export_checkpoint("runs/tiny", "out/tiny", fmt="moray", step=200)  # moray_config.yaml + safetensors

The checkpoint may have been saved under any layout (pp/tp/ep/dp, float32 or bf16):
`weights.DcpWeights` gathers whole tensors without a process group. Memory: one layer of
whole tensors (the reader) plus one output shard (`max_shard_bytes`, 5 GB by default, as
save_pretrained), not the whole model. By default every file is checksummed against the
manifest first, which reads the checkpoint (optimizer state included) once more.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from moray.model.config import ModelConfig
from moray.model.hf import config_to_hf, save_hf_dir
from moray.model.safetensors_io import DEFAULT_SHARD_BYTES, save_moray_dir
from moray.platform.checkpoint.manifest import read_manifest
from moray.platform.weights import DcpWeights, WeightSource, find_checkpoint

FORMATS = ("hf", "moray")


class LazyState(Mapping):
    """A source's tensors as a read-only state dict that reads each tensor when it is asked for,
    so writers that take a dict (save_hf_dir) stream instead of holding the model."""

    def __init__(self, src: WeightSource):
        self.src = src

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.src.names:
            raise KeyError(name)
        return self.src.get(name)

    def __contains__(self, name) -> bool:
        return name in self.src.names

    def __iter__(self):
        return iter(self.src.names)

    def __len__(self) -> int:
        return len(self.src.names)


@dataclass
class ExportResult:
    out: Path
    fmt: str
    source: DcpWeights
    files: List[str]
    bytes: int
    seconds: float
    layout: Optional[dict]  # the layout the checkpoint was saved under, as the run recorded it


def export_checkpoint(path: str, out_dir: str, fmt: str = "hf", step: Optional[int] = None,
                      dtype: Optional[torch.dtype] = None, model_cfg: Optional[ModelConfig] = None,
                      overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      verify: bool = True, master: bool = False) -> ExportResult:
    """Write the committed checkpoint at `path` (run dir, checkpoint root or step dir; local or a
    pyarrow URI) to `out_dir` (local) as `fmt`. `model_cfg` is used only when the run's
    config.yaml is not beside the checkpoint. `master`: export the fp32 master copies of a bf16
    run instead of the bf16 parameters the model computes with. Refuses (WeightsError, a
    ValueError) before writing anything when the checkpoint or config does not fit."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: use one of {', '.join(FORMATS)}")
    start = time.perf_counter()
    ref = find_checkpoint(path, step)
    if fmt == "hf" and (ref.model_cfg or model_cfg):
        config_to_hf(ref.model_cfg or model_cfg)  # dense or gelu models have no Mixtral form: refuse first
    src = DcpWeights(ref, ref.model_cfg or model_cfg, master=master)
    if verify:
        src.verify()
    if fmt == "hf":
        out = save_hf_dir(out_dir, src.cfg, LazyState(src), dtype, max_shard_bytes, overwrite)
    else:
        pairs = ((n, src.get(n)) for n in src.names)
        out = save_moray_dir(out_dir, src.cfg, pairs, max_shard_bytes, overwrite, dtype)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    size = sum((out / f).stat().st_size for f in files)
    layout = src.extra().get("layout") or read_manifest(ref.loc).layout
    return ExportResult(out, fmt, src, files, size, time.perf_counter() - start, layout)
