"""Whole-model weights by moray parameter name, from any place a model's weights live.

    src = open_weights("runs/tiny")                 # a run: its latest committed checkpoint
    src = open_weights("runs/tiny", step=200)       # ... or one step of it
    src = open_weights("s3://b/ckpt/step_0000200")  # a checkpoint root or step dir (local or pyarrow URI)
    src = open_weights("hf/Mixtral-8x7B")           # config.json + *.safetensors (Hugging Face)
    src = open_weights("moray/tiny")                # moray_config.yaml + *.safetensors (`moray convert`)
    src.cfg, src.get("layers.0.attention.wq.weight")  # whole tensors, read on demand
    src.read({"layers.0.feed_forward.experts.w1": (slice(2, 4),)})  # (name, piece) pairs: only the pieces are read

A training checkpoint is read without a process group: DCP's metadata gives each
parameter's global shape and dtype, and `dcp.load(..., no_dist=True)` into whole
tensors of those shapes gathers every rank's shards (any pp/tp/ep/dp layout). Only
"model.*" keys are read, never optimizer state, and one layer at a time, so reading
needs about one layer of memory (plus the embedding). The model config comes from the
run's config.yaml (a run dir, or a step dir under `<run>/checkpoints`), else the
caller's; either way every tensor's shape is checked against it before anything is read.

A serving rank wants pieces, not whole tensors: its experts' rows and its tensor-parallel
columns (`read` with a Region per name, in moray's layout). Every kind reads just those: the
safetensors directories through `get_slice` (a Hugging Face directory keeps each expert in
tensors of its own, so other experts' are never opened), a training checkpoint through DCP's
resharding planner asked for the pieces and a reader that fetches only their bytes
(weights_dcp.py).
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from moray.model.config import ModelConfig
from moray.model.hf import _EXPERT_MATS, _LAYER_NAMES, hf_state_keys, read_hf_config  # the one hub name table
from moray.model.safetensors_io import (MORAY_CONFIG_NAME, CheckpointError, Region, SafetensorsDir, check_keys,
                                        moray_state_keys, read_moray_config)
from moray.platform.checkpoint import fs as cfs
from moray.platform.checkpoint import manifest as mf

RUN_CONFIG = "config.yaml"


class WeightsError(CheckpointError):
    """A weights source is missing, incomplete or does not fit; a ValueError, so the CLI prints one line."""


# ---------------------------------------------------------------- finding a training checkpoint


@dataclass
class CheckpointRef:
    """One committed training checkpoint, and what describes it."""

    loc: cfs.Location  # the step directory
    step: int
    model_cfg: Optional[ModelConfig]  # from the run's config.yaml, when one was found
    config_path: Optional[str]


def read_run_config(path: str | os.PathLike) -> tuple[ModelConfig, Optional[str]]:
    """A run's config.yaml -> (its model section, its train.storage). Plain YAML, no pydantic,
    so this reads on machines without the control plane's dependencies."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise WeightsError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise WeightsError(f"{path}: no `model` section; expected a run's config.yaml (or a moray config file)")
    try:
        cfg = ModelConfig.from_dict(raw["model"])
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: bad model section: {e}") from None
    return cfg, (raw.get("train") or {}).get("storage")


def _steps(root: cfs.Location) -> tuple[List[int], List[int]]:
    entries = mf.list_checkpoints(root)
    return [e.step for e in entries if e.committed], [e.step for e in entries if not e.committed]


def _pick_step(root: cfs.Location, step: Optional[int]) -> cfs.Location:
    committed, torn = _steps(root)
    torn_note = f"; incomplete (no manifest.json, never committed): {torn}" if torn else ""
    if step is None:
        name = mf.read_latest(root)
        parsed = mf.parse_name(name) if name else None
        if parsed is None or parsed[1] is not None:
            raise WeightsError(f"no committed checkpoint under {root} (no `latest` pointer){torn_note}; "
                               "train until a checkpoint commits, or name a step directory")
        step = parsed[0]
    elif step not in committed:
        raise WeightsError(f"step {step} has no committed checkpoint under {root}; committed steps: "
                           f"{committed or 'none'}{torn_note}")
    return root.child(mf.checkpoint_name(step))


def find_checkpoint(path: str, step: Optional[int] = None) -> CheckpointRef:
    """A run dir, a checkpoint root (`latest` + step_*) or a step dir, local or a pyarrow URI ->
    the committed step directory (`step`, else what `latest` names)."""
    loc = cfs.resolve(path)
    if not cfs.exists(loc):
        raise WeightsError(f"{path}: no such run or checkpoint directory")
    model_cfg, config_path = None, None
    if loc.is_local and (Path(loc.path) / RUN_CONFIG).is_file():  # a run directory
        config_path = str(Path(loc.path) / RUN_CONFIG)
        model_cfg, storage = read_run_config(config_path)
        loc = cfs.resolve(storage) if storage else loc.child("checkpoints")
        if not cfs.exists(loc):
            raise WeightsError(f"run {path} has no checkpoints: {loc} does not exist (train.storage in "
                               f"{config_path}); train until a checkpoint commits")
    parsed = mf.parse_name(loc.name)
    if parsed is None:  # a checkpoint root
        loc = _pick_step(loc, step)
    elif parsed[1] is not None:
        raise WeightsError(f"{loc} is a save in progress or one that crashed ({parsed[1]}); "
                           f"use a committed step_NNNNNNN directory")
    elif step is not None and step != parsed[0]:
        raise WeightsError(f"{loc} is step {parsed[0]}, not step {step}; name the root to pick a step")
    if not cfs.exists(loc.child(mf.MANIFEST)):
        committed, _ = _steps(cfs.Location(loc.fs, os.path.dirname(loc.path), loc.scheme))
        raise WeightsError(f"incomplete checkpoint: {loc} has no {mf.MANIFEST} (the save never committed); "
                           f"committed steps beside it: {committed or 'none'}")
    if model_cfg is None:
        model_cfg, config_path = _config_near(loc)
    return CheckpointRef(loc, mf.parse_name(loc.name)[0], model_cfg, config_path)


def _config_near(step_dir: cfs.Location) -> tuple[Optional[ModelConfig], Optional[str]]:
    """The model config of a step dir named alone: the run's config.yaml when the step sits
    under `<run>/checkpoints/`; else none (the caller supplies one)."""
    if step_dir.is_local:
        candidate = Path(step_dir.path).parent.parent / RUN_CONFIG
        if candidate.is_file():
            return read_run_config(candidate)[0], str(candidate)
    return None, None


# ---------------------------------------------------------------- sources


def expected_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    """moray name -> whole-tensor shape, for every tensor a full checkpoint of `cfg` stores."""
    from moray.model.transformer import Transformer

    with torch.device("meta"):
        sd = Transformer(cfg).state_dict()
    return {k: tuple(sd[k].shape) for k in moray_state_keys(cfg)}


class WeightSource:
    """cfg, names (what a full model needs), get(name[, region]) -> the tensor or a piece of it, in
    moray's layout; read({name: region or None}) -> (name, tensor) pairs; kind, where, step for humans."""

    kind = ""

    def __init__(self, cfg: ModelConfig, where: str, step: Optional[int] = None):
        self.cfg, self.where, self.step = cfg, where, step
        self.names = moray_state_keys(cfg)

    def get(self, name: str, region: Optional[Region] = None) -> torch.Tensor:
        raise NotImplementedError

    def read(self, wanted: Dict[str, Optional[Region]]) -> Iterator[Tuple[str, torch.Tensor]]:
        """Each wanted tensor, whole (None) or only its region, in the order given."""
        for name, region in wanted.items():
            yield name, self.get(name, region)


class MorayDirWeights(WeightSource):
    kind = "moray"

    def __init__(self, path: str):
        super().__init__(read_moray_config(path), str(path))
        self.src = SafetensorsDir(path)
        check_keys(self.src.keys(), self.names, f"{path} (moray checkpoint)")

    def get(self, name: str, region: Optional[Region] = None) -> torch.Tensor:
        tied = name == "output.weight" and self.cfg.tie_embeddings
        return self.src.get("tok_embeddings.weight" if tied else name, region)


class HfWeights(WeightSource):
    """A hub Mixtral directory, by moray name (experts stacked and transposed as moray holds them)."""

    kind = "hf"

    def __init__(self, path: str):
        super().__init__(read_hf_config(path), str(path))
        self.src = SafetensorsDir(path)
        keys = [k for k in self.src.keys() if not k.endswith("rotary_emb.inv_freq")]
        if self.cfg.tie_embeddings:
            keys = [k for k in keys if k != "lm_head.weight"]
        check_keys(keys, hf_state_keys(self.cfg), f"{path} (MixtralForCausalLM checkpoint)")

    def get(self, name: str, region: Optional[Region] = None) -> torch.Tensor:
        top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "output.weight": "model.embed_tokens.weight" if self.cfg.tie_embeddings else "lm_head.weight"}
        if name in top:
            return self.src.get(top[name], region)
        _, i, rest = name.split(".", 2)
        if rest in _LAYER_NAMES:  # the same (out, in) layout in both
            return self.src.get(f"model.layers.{i}.{_LAYER_NAMES[rest]}", region)
        w = rest.removeprefix("feed_forward.experts.")
        if w not in _EXPERT_MATS:
            raise WeightsError(f"{self.where}: no Hugging Face tensor for moray's {name!r}")
        # moray's (E, in, out) stacks the hub's per-expert (out, in): the region's expert rows pick
        # which experts' tensors are opened at all, its (in, out) slices read as the hub's (out, in).
        experts, rows, cols = (tuple(region or ()) + (slice(None),) * 3)[:3]
        pick = range(self.cfg.n_experts)[experts]
        return torch.stack([self.src.get(f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight",
                                         None if region is None else (cols, rows)).t() for j in pick])


class DcpWeights(WeightSource):
    """A committed training checkpoint (DCP shards of any layout), read as whole tensors or pieces.

    master=True reads the fp32 master copies ("optim.<fqn>.master", kept when training in
    bf16) where the checkpoint has them, the parameters ("model.<fqn>") elsewhere.
    """

    kind = "checkpoint"

    def __init__(self, ref: CheckpointRef, cfg: Optional[ModelConfig] = None, master: bool = False):
        cfg = cfg or ref.model_cfg
        if cfg is None:
            raise WeightsError(f"{ref.loc}: no run config.yaml found beside this checkpoint, so its model config "
                               f"is unknown; pass the run's config (--config runs/NAME/config.yaml)")
        super().__init__(cfg, str(ref.loc), ref.step)
        self.ref = ref
        try:
            meta = cfs.dcp_reader(ref.loc).read_metadata().state_dict_metadata
        except (OSError, EOFError, RuntimeError) as e:
            raise WeightsError(f"{ref.loc}: DCP metadata unreadable ({type(e).__name__}: {e})") from None
        self.keys: Dict[str, str] = {}  # moray name -> checkpoint key
        self.meta = {}
        for name in self.names:
            key = f"optim.{name}.master" if master and f"optim.{name}.master" in meta else f"model.{name}"
            self.keys[name], self.meta[name] = key, meta.get(key)
        self._check_shapes({k[len("model."):] for k in meta if k.startswith("model.")})
        self._group, self._cache = None, {}

    def _check_shapes(self, stored: set) -> None:
        want = expected_shapes(self.cfg)
        missing = sorted(set(want) - stored)
        extra = sorted(stored - set(want) - ({"output.weight"} if self.cfg.tie_embeddings else set()))
        wrong = [f"{n} is {tuple(self.meta[n].size)}, the config wants {want[n]}" for n in want
                 if n not in missing and tuple(self.meta[n].size) != want[n]]
        if missing or extra or wrong:
            raise WeightsError(
                f"{self.where} does not hold the model its config describes: "
                + "; ".join(filter(None, [f"missing {missing[:5]}" if missing else "",
                                          f"unexpected {extra[:5]}" if extra else "", "; ".join(wrong[:5])]))
                + "; is this the right run's config?")

    def get(self, name: str, region: Optional[Region] = None) -> torch.Tensor:
        if region is not None:
            return self._load({name: region})[name]
        # A layer's tensors come in one dcp.load and stay until the next layer is asked for.
        group = _layer_of(name)
        if group != self._group:
            names = [n for n in self.names if n == group or n.startswith(group + ".")]
            self._cache, self._group = self._load(dict.fromkeys(names)), group
        return self._cache[name]

    def read(self, wanted: Dict[str, Optional[Region]]) -> Iterator[Tuple[str, torch.Tensor]]:
        """One dcp.load per layer, each tensor whole or only its region (see weights_dcp.py)."""
        names = list(wanted)
        for _, group in itertools.groupby(names, key=_layer_of):
            yield from self._load({n: wanted[n] for n in group}).items()

    def _load(self, wanted: Dict[str, Optional[Region]]) -> Dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        from moray.platform.weights_dcp import NarrowLoadPlanner, RangedReader

        state, offsets = {}, {}
        for n, region in wanted.items():
            whole = tuple(self.meta[n].size)
            spans = [s.indices(d) for s, d in zip(region or (), whole)]  # (start, stop, step) per sliced dim
            if any(step != 1 for _, _, step in spans):
                raise ValueError(f"{n}: a region is contiguous slices (step 1), not {region}")
            shape = tuple(stop - start for start, stop, _ in spans) + whole[len(spans):]
            state[self.keys[n]] = torch.empty(shape, dtype=self.meta[n].properties.dtype)
            offsets[self.keys[n]] = tuple(start for start, _, _ in spans) + (0,) * (len(whole) - len(spans))
        with warnings.catch_warnings():  # "torch.distributed is disabled": no_dist is the point
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=RangedReader(cfs.dcp_reader(self.ref.loc)),
                     planner=NarrowLoadPlanner(offsets), no_dist=True)
        return {n: state[self.keys[n]] for n in wanted}

    def verify(self) -> None:
        """Checksum every file against the manifest (reads the whole checkpoint once)."""
        manifest = mf.read_manifest(self.ref.loc)
        problems = mf.verify_files(self.ref.loc, manifest, sorted(manifest.files))
        if problems:
            raise WeightsError(f"checkpoint {self.where} is corrupt: {'; '.join(problems[:5])}")

    def extra(self) -> dict:
        """The checkpoint's extra.json (step, tokens_seen, layout, ...); {} if it has none."""
        try:
            return json.loads(cfs.get_bytes(self.ref.loc.child(mf.EXTRA)))
        except (FileNotFoundError, ValueError):
            return {}


def _layer_of(name: str) -> str:
    """"layers.3" for any of layer 3's tensors, the name itself otherwise (embedding, norm, head)."""
    return ".".join(name.split(".")[:2]) if name.startswith("layers.") else name


def open_weights(path: str, step: Optional[int] = None, model_cfg: Optional[ModelConfig] = None,
                 master: bool = False) -> WeightSource:
    """Whichever source `path` is (see the module doc). `model_cfg` describes a training checkpoint
    whose run config.yaml is not beside it; `step` and `master` apply to training checkpoints."""
    p = Path(path)
    if "://" not in str(path) and p.is_dir():
        if (p / "config.json").is_file():
            return HfWeights(str(path))
        if (p / MORAY_CONFIG_NAME).is_file():
            return MorayDirWeights(str(path))
    ref = find_checkpoint(str(path), step)
    return DcpWeights(ref, ref.model_cfg or model_cfg, master)
