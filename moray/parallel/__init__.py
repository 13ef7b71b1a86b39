"""How one model is split over many devices: torch.distributed only, no Ray.

    from moray.parallel import ParallelConfig, ParallelDims, TrainEngine

ParallelConfig and ParallelDims are plain Python (the controller validates a
layout with them before any worker starts); TrainEngine is imported on first
use, so importing the config does not pull in torch.distributed.pipelining.
"""

from moray.parallel.config import ParallelConfig
from moray.parallel.dims import LayoutError, ParallelDims

__all__ = ["ParallelConfig", "ParallelDims", "LayoutError", "TrainEngine"]


def __getattr__(name):
    if name == "TrainEngine":
        from moray.parallel.engine import TrainEngine

        return TrainEngine
    raise AttributeError(f"module 'moray.parallel' has no attribute {name!r}")
