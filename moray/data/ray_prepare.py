"""Run preparation on Ray Data: one task per part, with Ray Data's progress bars.

The only module of moray.data that touches Ray, and only inside functions, so
`import moray.data` works on machines without Ray. Shards are written by the
tasks themselves, so on a multi-node cluster data.dir and the sources must be
reachable from every node (a shared file system or a pyarrow.fs URI).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None) -> bool:
    """Join the cluster at `address` / RAY_ADDRESS, or start a small embedded one.
    Returns True when this call started Ray (the caller should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or min(os.cpu_count() or 1, 4), include_dashboard=False)
    return True


def ray_map(fn: Callable[[Dict], Dict], tasks: List[Dict]) -> List[Dict]:
    """`[fn(t) for t in tasks]` as a Ray Data pipeline (results in any order)."""
    import ray

    if not tasks:
        return []
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    items = [{"task": json.dumps(t)} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block, so one task, per part
    ds = ds.map(_Apply(fn), num_cpus=1)
    return [json.loads(row["record"]) for row in ds.take_all()]


class _Apply:
    """A picklable row function (a plain callable object: Ray Data runs it as a task, not an actor)."""

    def __init__(self, fn: Callable[[Dict], Dict]) -> None:
        self.fn = fn

    def __call__(self, row: Dict) -> Dict:
        return {"record": json.dumps(self.fn(json.loads(row["task"])))}
