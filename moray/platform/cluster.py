"""Connecting to Ray: the cluster named by `cluster.address` / RAY_ADDRESS, or an
embedded local one when none is named (so `python jobs/pretrain.py` just works).

Ray 2.60's `ray start` turns on token authentication; clients such as
`ray job submit` need `RAY_AUTH_MODE=token` and the token file `ray start`
wrote. Inside a job submitted that way, RAY_ADDRESS is already set.
"""

from __future__ import annotations

import math
import os
from typing import Optional


def connect(address: Optional[str] = None, min_cpus: float = 1.0) -> str:
    """Connect once; return "existing", "remote" or "embedded"."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return "remote"
    # Logical CPUs: enough for every worker even on a 2-core laptop; the OS shares the cores.
    num_cpus = max(os.cpu_count() or 1, math.ceil(min_cpus))
    # The dashboard serves the state API that Ray Train's clean-up actor polls.
    # address="local": always a new cluster of our own, even when another one runs on this machine
    # (Ray would otherwise try to join it and refuse num_cpus).
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    return "embedded"
