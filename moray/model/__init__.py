"""The MoE transformer in pure torch: no Ray, no torch.distributed."""

from moray.model.config import ModelConfig, RopeScaling
from moray.model.params import ParamCount, count_params
from moray.model.transformer import MoEAux, Transformer, build_model

__all__ = ["ModelConfig", "RopeScaling", "ParamCount", "count_params", "MoEAux", "Transformer", "build_model"]
