"""One path -> a model ready to serve, whichever of moray's three kinds of weights it holds.

    loaded = load_for_serving("hf/Mixtral-8x7B")          # config.json + *.safetensors ("hf")
    loaded = load_for_serving("out/tiny-moray")           # moray_config.yaml + *.safetensors ("moray")
    loaded = load_for_serving("runs/tiny")                # a run: its latest committed checkpoint
    loaded = load_for_serving("runs/tiny/checkpoints/step_0000200", dtype=torch.bfloat16)
    loaded.model, loaded.config, loaded.tokenizer, loaded.source

Finding and reading the weights is `moray.platform.weights.open_weights`'s job (the same
code `moray export` and `train.init_from` use: any checkpoint layout, no process group, a
layer at a time). Here the model is built on the meta device and each parameter is the
tensor read (cast and moved once), so nothing is randomly initialised first and a large
model is never held twice. Weights keep their stored dtype unless `dtype` is given
(bf16 checkpoints stay bf16); the model comes back in eval mode without gradients.

The tokenizer: a `tokenizer.json` beside the weights (Hugging Face and moray directories),
else the run's `data.tokenizer` for a training checkpoint (see moray/data/tokenizer.py),
else None: callers then pass token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch

from moray.model.config import ModelConfig
from moray.model.layers import rope_tables
from moray.model.safetensors_io import CheckpointError, Region
from moray.model.transformer import Transformer

KINDS = ("a Hugging Face Mixtral directory (config.json + *.safetensors), a `moray convert` output "
         "(moray_config.yaml + model.safetensors), or a training run / checkpoint root / step_NNNNNNN directory")
TOKENIZER_FILE = "tokenizer.json"


class LoadError(CheckpointError):
    """A path cannot be served: not a model, incomplete, or weights that do not fit their config."""


@dataclass
class LoadedModel:
    model: Transformer  # eval mode, requires_grad off, on the requested device
    config: ModelConfig
    tokenizer: Optional[Any]  # ByteTokenizer / HFTokenizer, or None (prompts are token ids)
    source: str  # "hf", "moray" or "checkpoint"
    path: str  # where the weights were read (a checkpoint's step directory)
    step: Optional[int] = None  # a training checkpoint's step


def load_for_serving(path: str, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                     *, step: Optional[int] = None, model_cfg: Optional[ModelConfig] = None,
                     tokenizer: Optional[str] = None) -> LoadedModel:
    """`path`: any of KINDS, local or (checkpoints) a pyarrow URI. `step` picks a checkpoint of a
    run or root (default: `latest`); `model_cfg` describes a checkpoint that has no run config.yaml
    beside it; `tokenizer` ("byte" or a tokenizer.json) overrides the one found."""
    if dtype is not None and not dtype.is_floating_point:
        raise LoadError(f"dtype {dtype}: serving needs a floating-point dtype (bfloat16, float16, float32)")
    src = open_source(path, step=step, model_cfg=model_cfg)
    try:
        model = materialise(src, dtype, device)
    except CheckpointError as e:  # WeightsError, a missing file, keys that do not match
        raise LoadError(f"cannot serve {path}: {e}{_kinds_hint(path)}") from None
    tok = _tokenizer(src, tokenizer)
    if tok is not None and tok.vocab_size > src.cfg.vocab_size:
        raise LoadError(f"{path}: the tokenizer has {tok.vocab_size} ids but the model only {src.cfg.vocab_size} "
                        f"(model.vocab_size); pass the tokenizer this model was trained with (tokenizer=...)")
    return LoadedModel(model, src.cfg, tok, src.kind, src.where, src.step)


def open_source(path: str, step: Optional[int] = None, model_cfg: Optional[ModelConfig] = None):
    """The weights at `path` (any of KINDS), opened but not read: `open_weights` with this module's
    checks and error messages. A pipeline stage opens the source and reads only its own names."""
    from moray.platform.weights import open_weights  # pyarrow and the checkpoint store: only here

    _check_local_path(path)
    try:
        return open_weights(str(path), step=step, model_cfg=model_cfg)
    except CheckpointError as e:  # WeightsError, a missing file, keys that do not match
        raise LoadError(f"cannot serve {path}: {e}{_kinds_hint(path)}") from None


def _check_local_path(path: str) -> None:
    if "://" in str(path):
        return
    p = Path(path)
    if not p.exists():
        raise LoadError(f"cannot serve {path}: no such file or directory; expected {KINDS}")
    if p.is_file():
        raise LoadError(f"cannot serve {path}: it is a file; point at the directory that holds it ({KINDS})")


def _kinds_hint(path: str) -> str:
    """The kinds expected, when a local directory shows none of their marks."""
    p = Path(path)
    if "://" in str(path) or not p.is_dir() or p.name.startswith("step_"):
        return ""
    marks = ("config.json", "moray_config.yaml", "config.yaml", "latest", "manifest.json")
    if any((p / m).exists() for m in marks) or any(p.glob("step_*")):
        return ""
    return f" ({path} has none of config.json, moray_config.yaml, config.yaml, latest, step_*: expected {KINDS})"


@torch.no_grad()
def materialise(src, dtype: Optional[torch.dtype], device: Union[str, torch.device],
                cut: Optional[Callable[[Transformer], Optional[Dict[str, Region]]]] = None) -> Transformer:
    """A Transformer whose parameters are the source's tensors (cast, moved), built on meta.

    `cut(model)` runs on the meta model first and may remove parts of it (a pipeline stage's
    keep_stage) or narrow parameters to a shard (apply_ep's experts, apply_tp's columns); it
    returns, for each parameter it narrowed, the Region of the stored tensor that the shard is.
    Only the names left are read, and of those only their regions (src.read).
    Raises CheckpointError (LoadError for weights that do not fit the config)."""
    cfg, device = src.cfg, torch.device(device)
    with torch.device("meta"):
        model = Transformer(cfg)
    regions = (cut(model) if cut is not None else None) or {}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wanted = {n: regions.get(n) for n in src.names if n in want}  # not another stage's
    # A last stage without the first's embedding still needs it as its tied head (stored once).
    tied_head = cfg.tie_embeddings and "output.weight" in want and "tok_embeddings.weight" not in want
    if tied_head:
        wanted["tok_embeddings.weight"] = regions.get("output.weight")
    sd = {}
    for name, t in src.read(wanted):
        name = "output.weight" if tied_head and name == "tok_embeddings.weight" else name
        if tuple(t.shape) != want[name]:
            raise LoadError(f"{src.where}: {name} is {tuple(t.shape)} but its config wants {want[name]}; the "
                            f"weights do not match the config beside them (was the config edited or copied "
                            f"from another model?)")
        sd[name] = t.to(device=device, dtype=dtype or t.dtype)
    if cfg.tie_embeddings and "output.weight" in want and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    # The rotary tables are not stored; like build_model, they take the weights' dtype.
    cos, sin = rope_tables(cfg, device=device)
    weights_dtype = sd.get("tok_embeddings.weight", next(iter(sd.values()))).dtype  # a later stage has none
    model.rope_cos, model.rope_sin = cos.to(weights_dtype), sin.to(weights_dtype)
    model.requires_grad_(False)
    return model.eval()


def _tokenizer(src, spec: Optional[str]):
    from moray.data.tokenizer import load_tokenizer

    if spec is not None:
        return load_tokenizer(spec)
    if src.kind in ("hf", "moray"):
        file = Path(src.where) / TOKENIZER_FILE
        return load_tokenizer(str(file)) if file.is_file() else None
    config_path = getattr(getattr(src, "ref", None), "config_path", None)
    return _run_tokenizer(config_path) if config_path else None


def _run_tokenizer(config_path: str):
    """A training run's data.tokenizer (default "byte"); a relative path is tried from the
    working directory, then from the run's directory."""
    import yaml

    from moray.data.tokenizer import load_tokenizer

    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    spec = str(((raw.get("data") or {}).get("tokenizer")) or "byte")
    if spec in ("byte", "byte-v1") or Path(spec).is_file():
        return load_tokenizer(spec)
    beside = Path(config_path).parent / spec
    if beside.is_file():
        return load_tokenizer(str(beside))
    raise LoadError(f"{config_path}: data.tokenizer is {spec!r}, which is not a file here or beside the run; "
                    f"pass tokenizer='path/to/tokenizer.json' (or tokenizer='byte')")


__all__ = ["LoadedModel", "LoadError", "load_for_serving", "open_source", "materialise"]
