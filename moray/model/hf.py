"""Hugging Face Mixtral <-> moray: configs, tensor names, checkpoint directories.

Imports only torch and safetensors. The on-disk format is the hub's, the one
`MixtralForCausalLM.save_pretrained` writes and `from_pretrained` loads (in
transformers 4.x and 5.x alike):

    hub (per expert j, nn.Linear layout (out, in))     moray (stacked, (E, in, out))
    model.embed_tokens.weight                           tok_embeddings.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight    layers.{i}.attention.w{q,k,v,o}.weight
    model.layers.{i}.input_layernorm.weight             layers.{i}.attention_norm.weight
    model.layers.{i}.post_attention_layernorm.weight    layers.{i}.ffn_norm.weight
    model.layers.{i}.block_sparse_moe.gate.weight       layers.{i}.feed_forward.gate.weight
    ...block_sparse_moe.experts.{j}.w1.weight (F, D)    layers.{i}.feed_forward.experts.w1[j] (D, F)  gate
    ...block_sparse_moe.experts.{j}.w3.weight (F, D)    layers.{i}.feed_forward.experts.w3[j] (D, F)  up
    ...block_sparse_moe.experts.{j}.w2.weight (D, F)    layers.{i}.feed_forward.experts.w2[j] (F, D)  down
    model.norm.weight, lm_head.weight                   norm.weight, output.weight

Attention weights need no permutation: both use the rotate-half rotary layout.
transformers 5.x fuses experts in memory (`mlp.experts.gate_up_proj` (E, 2F, D),
`down_proj` (E, D, F)) and converts on load and save; `to_hf_module_state`
fills either in-memory layout for callers that skip the disk (benchmarks).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from moray.model.config import ModelConfig
from moray.model.hf_config import config_from_hf, config_to_hf
from moray.model.safetensors_io import (
    DEFAULT_SHARD_BYTES, CheckpointError, SafetensorsDir, check_keys, load_moray_dir, moray_state_keys,
    prepare_out_dir, read_moray_config, save_moray_dir, write_safetensors,
)

Getter = Callable[[str], torch.Tensor]

_LAYER_NAMES = {  # moray name in a layer -> hub name in a layer
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.gate.weight": "block_sparse_moe.gate.weight",
}
_EXPERT_MATS = ("w1", "w2", "w3")
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
# Files beside the weights that a conversion carries over unchanged, both ways.
SIDECAR_PATTERNS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "chat_template*", "*.model")


# ---------------------------------------------------------------- tensor names


def hf_state_keys(cfg: ModelConfig) -> List[str]:
    keys = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if cfg.tie_embeddings else ["lm_head.weight"])
    for i in range(cfg.n_layers):
        keys += [f"model.layers.{i}.{h}" for h in _LAYER_NAMES.values()]
        keys += [f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight"
                 for j in range(cfg.n_experts) for w in _EXPERT_MATS]
    return keys


def moray_tensors_from_hf(cfg: ModelConfig, get: Getter) -> Iterator[Tuple[str, torch.Tensor]]:
    """Hub tensors (fetched lazily by name) -> moray (name, tensor) pairs, one layer at a time."""
    yield "tok_embeddings.weight", get("model.embed_tokens.weight")
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            yield f"layers.{i}.{ours}", get(f"model.layers.{i}.{theirs}")
        for w in _EXPERT_MATS:  # (F, D) or (D, F) per expert -> (E, D, F) or (E, F, D)
            per_expert = [get(f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight").t()
                          for j in range(cfg.n_experts)]
            yield f"layers.{i}.feed_forward.experts.{w}", torch.stack(per_expert)
    yield "norm.weight", get("model.norm.weight")
    if not cfg.tie_embeddings:
        yield "output.weight", get("lm_head.weight")


def hf_tensors_from_moray(cfg: ModelConfig, get: Getter) -> Iterator[Tuple[str, torch.Tensor]]:
    """moray tensors -> hub (name, tensor) pairs, in the order save_pretrained writes them."""
    yield "model.embed_tokens.weight", get("tok_embeddings.weight")
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            yield f"model.layers.{i}.{theirs}", get(f"layers.{i}.{ours}")
        for w in _EXPERT_MATS:
            stacked = get(f"layers.{i}.feed_forward.experts.{w}")
            for j in range(cfg.n_experts):
                yield f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight", stacked[j].t().contiguous()
    yield "model.norm.weight", get("norm.weight")
    if not cfg.tie_embeddings:
        yield "lm_head.weight", get("output.weight")


def _relevant_hf_keys(keys) -> List[str]:
    return [k for k in keys if not k.endswith(_IGNORED_HF_SUFFIXES)]


def state_dict_from_hf(cfg: ModelConfig, hf_sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """In memory: a hub-named state dict -> a moray state dict (load with Transformer.load_state_dict)."""
    keys = _relevant_hf_keys(hf_sd)
    if cfg.tie_embeddings:
        keys = [k for k in keys if k != "lm_head.weight"]
    check_keys(keys, hf_state_keys(cfg), "Hugging Face state dict")
    sd = dict(moray_tensors_from_hf(cfg, hf_sd.__getitem__))
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def state_dict_to_hf(cfg: ModelConfig, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """In memory: a moray state dict -> hub names (what save_pretrained writes)."""
    keys = [k for k in sd if not (cfg.tie_embeddings and k == "output.weight")]
    check_keys(keys, moray_state_keys(cfg), "moray state dict")
    return dict(hf_tensors_from_moray(cfg, sd.__getitem__))


def to_hf_module_state(cfg: ModelConfig, sd: Dict[str, torch.Tensor], module_keys) -> Dict[str, torch.Tensor]:
    """A moray state dict in the in-memory layout of the installed MixtralForCausalLM.

    `module_keys`: `hf_model.state_dict().keys()`. transformers >= 5 fuses experts
    (`mlp.experts.gate_up_proj` = cat(w1, w3) over rows, `down_proj` = w2); 4.x keeps hub names.
    """
    module_keys = set(module_keys)
    if "model.layers.0.mlp.experts.gate_up_proj" not in module_keys:
        return state_dict_to_hf(cfg, sd)
    check_keys([k for k in sd if not (cfg.tie_embeddings and k == "output.weight")], moray_state_keys(cfg),
               "moray state dict")
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            out[f"model.layers.{i}.{theirs.replace('block_sparse_moe.', 'mlp.')}"] = sd[f"layers.{i}.{ours}"]
        w1, w2, w3 = (sd[f"layers.{i}.feed_forward.experts.{w}"] for w in _EXPERT_MATS)
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=2).transpose(1, 2).contiguous()
        out[f"model.layers.{i}.mlp.experts.down_proj"] = w2.transpose(1, 2).contiguous()
    check_keys(out, {k for k in module_keys if not k.endswith(_IGNORED_HF_SUFFIXES)} - (
        {"lm_head.weight"} if cfg.tie_embeddings else set()), "installed MixtralForCausalLM")
    return out


def from_hf_module_state(cfg: ModelConfig, module_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of to_hf_module_state: tensors (or their .grad) of an installed MixtralForCausalLM."""
    if "model.layers.0.mlp.experts.gate_up_proj" not in module_state:
        return state_dict_from_hf(cfg, dict(module_state))
    F_ = cfg.ffn_hidden
    hub = {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in module_state.items()
           if ".mlp.experts." not in k and not k.endswith(_IGNORED_HF_SUFFIXES)}
    for i in range(cfg.n_layers):
        gate_up = module_state[f"model.layers.{i}.mlp.experts.gate_up_proj"]  # (E, 2F, D)
        down = module_state[f"model.layers.{i}.mlp.experts.down_proj"]  # (E, D, F)
        for j in range(cfg.n_experts):
            p = f"model.layers.{i}.block_sparse_moe.experts.{j}."
            hub[p + "w1.weight"], hub[p + "w3.weight"] = gate_up[j, :F_], gate_up[j, F_:]
            hub[p + "w2.weight"] = down[j]
    return state_dict_from_hf(cfg, hub)


# ---------------------------------------------------------------- directories


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    p = Path(path) / "config.json"
    if not p.exists():
        hint = " (it has moray_config.yaml: a moray directory?)" if (Path(path) / "moray_config.yaml").exists() else ""
        raise CheckpointError(f"{path}: no config.json, so not a Hugging Face model directory{hint}")
    return config_from_hf(json.loads(p.read_text()))


def _checked_hf_source(path: str | os.PathLike, cfg: ModelConfig) -> SafetensorsDir:
    src = SafetensorsDir(path)
    keys = _relevant_hf_keys(src.keys())
    if cfg.tie_embeddings:
        keys = [k for k in keys if k != "lm_head.weight"]
    check_keys(keys, hf_state_keys(cfg), f"{path} (MixtralForCausalLM checkpoint)")
    return src


def load_hf_dir(path: str | os.PathLike, dtype: Optional[torch.dtype] = None,
                ) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """A hub Mixtral directory -> (ModelConfig, moray state dict), in memory."""
    cfg = read_hf_config(path)
    src = _checked_hf_source(path, cfg)
    sd = {k: (t.to(dtype) if dtype is not None else t) for k, t in moray_tensors_from_hf(cfg, src.get)}
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return cfg, sd


def save_hf_dir(out_dir: str | os.PathLike, cfg: ModelConfig, sd: Dict[str, torch.Tensor],
                dtype: Optional[torch.dtype] = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                overwrite: bool = False) -> Path:
    """A moray state dict -> a directory MixtralForCausalLM.from_pretrained loads."""
    keys = [k for k in sd if not (cfg.tie_embeddings and k == "output.weight")]
    check_keys(keys, moray_state_keys(cfg), "moray state dict")
    return _write_hf(out_dir, cfg, hf_tensors_from_moray(cfg, sd.__getitem__), dtype, max_shard_bytes, overwrite)


def _write_hf(out_dir, cfg, pairs, dtype, max_shard_bytes, overwrite) -> Path:
    out = prepare_out_dir(out_dir, overwrite)
    first_dtype: List[torch.dtype] = []

    def cast():
        for k, t in pairs:
            t = t.to(dtype) if dtype is not None else t
            first_dtype[:1] = first_dtype[:1] or [t.dtype]
            yield k, t

    write_safetensors(out, cast(), max_shard_bytes)
    hf = config_to_hf(cfg, dtype or (first_dtype[0] if first_dtype else None))
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return out


def _copy_sidecars(src_dir, out_dir) -> None:
    for pattern in SIDECAR_PATTERNS:
        for f in Path(src_dir).glob(pattern):
            if f.is_file():
                shutil.copy2(f, Path(out_dir) / f.name)


def convert_hf_to_moray(src_dir, out_dir, dtype: Optional[torch.dtype] = None,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> ModelConfig:
    """Stream a hub Mixtral directory into a moray directory (about one layer in memory);
    tokenizer files and the generation config come along (SIDECAR_PATTERNS)."""
    cfg = read_hf_config(src_dir)
    src = _checked_hf_source(src_dir, cfg)
    save_moray_dir(out_dir, cfg, moray_tensors_from_hf(cfg, src.get), max_shard_bytes, overwrite, dtype)
    _copy_sidecars(src_dir, out_dir)
    return cfg


def convert_moray_to_hf(src_dir, out_dir, dtype: Optional[torch.dtype] = None,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> ModelConfig:
    """Stream a moray directory into a hub Mixtral directory."""
    cfg = read_moray_config(src_dir)
    config_to_hf(cfg)  # refuse unrepresentable configs before writing anything
    src = SafetensorsDir(src_dir)
    check_keys(src.keys(), moray_state_keys(cfg), f"{src_dir} (moray checkpoint)")
    _write_hf(out_dir, cfg, hf_tensors_from_moray(cfg, src.get), dtype, max_shard_bytes, overwrite)
    _copy_sidecars(src_dir, out_dir)
    return cfg


__all__ = ["config_from_hf", "config_to_hf", "state_dict_from_hf", "state_dict_to_hf", "to_hf_module_state",
           "from_hf_module_state",
           "load_hf_dir", "save_hf_dir", "convert_hf_to_moray", "convert_moray_to_hf", "load_moray_dir",
           "save_moray_dir", "hf_state_keys", "CheckpointError"]
