"""Planning defaults: what the planner assumes where the config file says nothing.

TrainConfig's own defaults are for the trainer's CPU tests (100 steps of 128
tokens in float32); planned as they stand, a file that gives only a model
("how big is this, and what does training it cost?") would come back as a
few GPU-minutes. Where the file does not set a training input, the planner
plans a real pretraining run instead, and the report names each figure that
came from here. "Not set" means absent from the file and from --set, read
from pydantic's `model_fields_set` (load_config keeps it): a value written in
the file counts as set even when it equals the trainer's default.

Each function returns (value, assumed): `assumed` says where a planning
default came from, in the report's words, and is None when the file set it.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from moray.model.config import ModelConfig
from moray.model.params import count_params
from moray.platform.planner.catalogue import Accelerator
from moray.platform.planner.flops import training_flops_with_attention
from moray.platform.planner.units import sci

# Chinchilla (Hoffmann et al. 2022): compute-optimal training takes ~20 tokens per parameter.
# For an MoE the parameter count is the active one: the rule trades parameters against tokens
# at a fixed compute C = 6ND, and the N in that product is what each token computes with.
# Total parameters would also count expert capacity no token pays for, and ask 20 x 1.87T =
# 37T tokens of the seed's GPT-4, ~3x its 13T; 20 x 287B active = 5.7T is ~2.3x under it, as
# large runs train past compute-optimal (the seed's 13T is 46 per active parameter; Llama 3 8B
# saw 15T). So it is a floor for a budget, not a forecast: --tokens gives the real one.
CHINCHILLA_TOKENS_PER_PARAM = 20
# The seed's GPT-4 pretrains at 8k; a longer model.max_seq_len is reached in a later, shorter
# stage, so planning the whole run at it would overstate attention FLOPs and activations.
PRETRAIN_SEQ_LEN = 8192
# Large runs train in bf16 (weights, activations; fp32 master weights and Adam). The trainer's
# float32 default is what its CPU runs use, so the "cpu" accelerator keeps it.
PLANNING_DTYPE = "bfloat16"
# DeepSeek LLM (Bi et al. 2024, sec. 3.1): the optimal batch in tokens is 0.2920 x C^0.3271,
# C the training compute in FLOPs. At the seed's 13T tokens it gives 59M for the seed's 60M.
BATCH_COEFFICIENT, BATCH_EXPONENT = 0.2920, 0.3271


def file_sets(section: Any, *names: str) -> bool:
    """Whether the config file (or --set) wrote any of these keys of a pydantic section."""
    return bool(set(names) & section.model_fields_set)


def file_sets_batch(config: Any) -> bool:
    """The global batch is the file's when it gives train.batch_tokens or parallel.microbatches
    (the trainer's batch is then dp x micro-batch x microbatches); micro_batch_size alone is a
    memory setting, the largest micro-batch the layouts search tries."""
    return file_sets(config.train, "batch_tokens") or config.parallel.microbatches is not None


def planned_seq_len(config: Any) -> Tuple[int, Optional[str]]:
    t, m = config.train, config.model
    if file_sets(t, "seq_len"):
        return t.seq_len, None
    if m.max_seq_len > PRETRAIN_SEQ_LEN:
        return PRETRAIN_SEQ_LEN, (f"assumed: model.max_seq_len {m.max_seq_len:,} capped at {PRETRAIN_SEQ_LEN:,}, "
                                  "the seed's pretraining length; set train.seq_len")
    return m.max_seq_len, "assumed: model.max_seq_len; set train.seq_len"


def planned_dtype(config: Any, accelerator: Accelerator) -> Tuple[str, Optional[str]]:
    t = config.train
    if file_sets(t, "dtype"):
        return t.dtype, None
    if accelerator.name == "cpu":
        return t.dtype, f"assumed: the trainer's default, {t.dtype} on cpu; set train.dtype"
    return PLANNING_DTYPE, f"assumed: large runs train in {PLANNING_DTYPE}; set train.dtype"


def chinchilla_tokens(model: ModelConfig) -> Tuple[float, str]:
    return (float(CHINCHILLA_TOKENS_PER_PARAM * count_params(model).active),
            f"{CHINCHILLA_TOKENS_PER_PARAM} x active parameters (Chinchilla); pass --tokens")


def planned_batch_tokens(model: ModelConfig, tokens: float, seq_len: int) -> Tuple[int, str]:
    """DeepSeek's compute-optimal batch for this run, in whole sequences (at least one)."""
    compute = training_flops_with_attention(model, tokens, seq_len)
    sequences = max(1, round(BATCH_COEFFICIENT * compute**BATCH_EXPONENT / seq_len))
    return sequences * seq_len, (f"assumed: {BATCH_COEFFICIENT:g} x C^{BATCH_EXPONENT:g} at C = {sci(compute)} "
                                 "FLOPs, DeepSeek LLM's optimal batch; set train.batch_tokens")


def planned_price(accelerator: Accelerator) -> Tuple[Optional[float], Optional[str]]:
    """The catalogue's assumed list price, for a request that names none (None: no price known)."""
    if accelerator.price_per_gpu_hour is None:
        return None, None
    return accelerator.price_per_gpu_hour, f"assumed for {accelerator.name}; pass --price-per-gpu-hour"
