"""Checkpoint directories of safetensors files: lazy reading, sharded writing, moray's own format.

A directory holds either one `model.safetensors` or shards
`model-00001-of-0000N.safetensors` listed in `model.safetensors.index.json`
(Hugging Face's layout, which moray's own directories share). Reading is lazy
and writing streams shard by shard, so converting Mixtral-8x7B (93 GB in bf16)
holds about one shard and one layer in memory, not the whole model.

moray's directory (what `moray convert --from-hf` writes):

    moray_config.yaml   {"model": {...}}: JSON, which is also YAML, so it reads
                        without pyyaml here and as a moray config file elsewhere
                        (`moray plan --config DIR/moray_config.yaml`)
    model.safetensors   moray's parameter names (or shards + index)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moray.model.config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MORAY_CONFIG_NAME = "moray_config.yaml"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default max_shard_size


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or not what it claims to be."""


# Part of a stored tensor: one slice (start, stop, step 1) per leading dim, the dims after them
# whole. A pipeline stage's rank asks for its expert rows and tensor-parallel columns this way.
Region = Tuple[slice, ...]


# ---------------------------------------------------------------- reading


class SafetensorsDir:
    """Lazy name -> tensor access to a (possibly sharded) safetensors directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map: Dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.path / SINGLE_NAME).exists():
            weight_map = {}
            with safe_open(self.path / SINGLE_NAME, framework="pt") as f:
                weight_map = {k: SINGLE_NAME for k in f.keys()}
        else:
            found = sorted(p.name for p in self.path.glob("*")) if self.path.is_dir() else []
            raise CheckpointError(
                f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME} here (found: {found or 'nothing'}); "
                "point at a directory written by save_pretrained / moray convert (safetensors only)"
            )
        self.weight_map = weight_map
        self._handles: Dict[str, object] = {}

    def keys(self) -> List[str]:
        return list(self.weight_map)

    def get(self, name: str, region: Optional[Region] = None) -> torch.Tensor:
        """The tensor, or only its `region` (one slice per leading dim), read through get_slice:
        safetensors maps the file and copies out just the region's bytes."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, framework="pt")
        f = self._handles[file]
        if region is None:
            return f.get_tensor(name)  # type: ignore[attr-defined]
        return f.get_slice(name)[tuple(region)]  # type: ignore[attr-defined]

    def close(self) -> None:
        self._handles.clear()


# ---------------------------------------------------------------- writing


def _storage_is_own(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def write_safetensors(out_dir: str | os.PathLike, tensors: Iterable[Tuple[str, torch.Tensor]],
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      metadata: Optional[Dict[str, str]] = None) -> List[str]:
    """Stream (name, tensor) pairs into `model.safetensors`, or shards + index past max_shard_bytes.

    Returns the file names written. Each tensor is copied off any shared storage,
    as safetensors refuses tensors that alias one another.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}  # transformers refuses files without format=pt
    shard: Dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    temp_files: List[Tuple[str, List[str]]] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            tmp = f".shard-{len(temp_files):05d}.tmp"
            save_file(shard, str(out / tmp), metadata=meta)
            temp_files.append((tmp, list(shard)))
            shard, shard_bytes = {}, 0

    for name, t in tensors:
        if name in shard or any(name in names for _, names in temp_files):
            raise CheckpointError(f"tensor {name!r} written twice")
        t = t.detach().to("cpu")
        t = t if _storage_is_own(t) else t.contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[name] = t
        shard_bytes += nbytes
        total += nbytes
    flush()

    if len(temp_files) == 1:
        os.replace(out / temp_files[0][0], out / SINGLE_NAME)
        return [SINGLE_NAME]
    n = len(temp_files)
    weight_map, files = {}, []
    for i, (tmp, names) in enumerate(temp_files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp, out / final)
        files.append(final)
        weight_map.update({k: final for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return files


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """An empty directory to write into; refuses to mix a new checkpoint into an old one."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out} exists and is not empty; choose a new --out or pass --overwrite")
        for p in out.iterdir():  # only what a conversion writes: tokenizers and the like stay
            if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".tmp")
                                or p.name in (INDEX_NAME, MORAY_CONFIG_NAME, "config.json")):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------- moray's directory


def moray_state_keys(cfg: ModelConfig) -> List[str]:
    """Every tensor a full moray checkpoint holds (the tied output projection is stored once)."""
    keys = ["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        keys += [p + f"attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        keys += [p + "attention_norm.weight", p + "ffn_norm.weight"]
        mats = ("w1", "w2", "w3") if cfg.mlp == "swiglu" else ("w1", "w2")
        if cfg.is_moe:
            keys.append(p + "feed_forward.gate.weight")
            keys += [p + f"feed_forward.experts.{w}" for w in mats]
        else:
            keys += [p + f"feed_forward.{w}.weight" for w in mats]
    keys.append("norm.weight")
    if not cfg.tie_embeddings:
        keys.append("output.weight")
    return keys


def check_keys(have: Iterable[str], want: Iterable[str], what: str) -> None:
    have, want = set(have), set(want)
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        raise CheckpointError(
            f"{what}: missing {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"({len(missing)} in all), unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''} "
            f"({len(extra)} in all); the checkpoint does not match its config"
        )


def read_moray_config(path: str | os.PathLike) -> ModelConfig:
    p = Path(path) / MORAY_CONFIG_NAME
    if not p.exists():
        hint = " (it has a config.json: a Hugging Face directory?)" if (Path(path) / "config.json").exists() else ""
        raise CheckpointError(f"{path}: no {MORAY_CONFIG_NAME}, so not a moray checkpoint directory{hint}")
    text = p.read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:  # hand-edited into real YAML
        import yaml

        raw = yaml.safe_load(text)
    if not isinstance(raw, dict) or "model" not in raw:
        raise CheckpointError(f"{path}/{MORAY_CONFIG_NAME}: expected a mapping with a 'model' section")
    return ModelConfig.from_dict(raw["model"])


def save_moray_dir(out_dir: str | os.PathLike, cfg: ModelConfig,
                   tensors: Dict[str, torch.Tensor] | Iterable[Tuple[str, torch.Tensor]],
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                   dtype: Optional[torch.dtype] = None) -> Path:
    """Write cfg and a full model's tensors (a state_dict, or a stream of pairs) as a moray directory."""
    out = prepare_out_dir(out_dir, overwrite)
    want = moray_state_keys(cfg)
    if isinstance(tensors, dict):
        sd = dict(tensors)
        if cfg.tie_embeddings:
            sd.pop("output.weight", None)  # the same tensor as the embedding
        check_keys(sd, want, "save_moray_dir")
        tensors = ((k, sd[k]) for k in want)
    written: List[str] = []

    def cast() -> Iterator[Tuple[str, torch.Tensor]]:
        for k, t in tensors:
            written.append(k)
            yield k, (t.to(dtype) if dtype is not None else t)

    write_safetensors(out, cast(), max_shard_bytes, metadata={"moray_format": "1"})
    check_keys(written, want, "save_moray_dir")
    (out / MORAY_CONFIG_NAME).write_text(json.dumps({"model": cfg.to_dict()}, indent=2) + "\n")
    return out


def load_moray_dir(path: str | os.PathLike, dtype: Optional[torch.dtype] = None,
                   ) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """(config, state_dict) ready for `build_model(cfg).load_state_dict(sd)`."""
    cfg = read_moray_config(path)
    src = SafetensorsDir(path)
    check_keys(src.keys(), moray_state_keys(cfg), f"{path}")
    cast: Callable[[torch.Tensor], torch.Tensor] = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    sd = {k: cast(src.get(k)) for k in moray_state_keys(cfg)}
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return cfg, sd
