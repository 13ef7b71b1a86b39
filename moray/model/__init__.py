"""The MoE transformer in pure torch: no Ray, no torch.distributed.

The config and parameter counts import no torch (the planner sizes a 1.8T
model with them in well under a second); the modules load on first use.
"""

from moray.model.config import ModelConfig, RopeScaling
from moray.model.params import ParamCount, count_params

__all__ = ["ModelConfig", "RopeScaling", "ParamCount", "count_params", "MoEAux", "Transformer", "build_model"]

_LAZY = {"MoEAux", "Transformer", "build_model"}


def __getattr__(name):
    if name in _LAZY:
        from moray.model import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'moray.model' has no attribute {name!r}")
