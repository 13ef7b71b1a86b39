"""The process's RNG states as JSON, for a checkpoint's `rank_extra`, and back, exactly.

    store.save(step, state, rank_extra={"rng": rng_state_json()})
    set_rng_state_json(store.load(state).rank_extra["rng"])

Covers torch's CPU generator, numpy's global one and Python's `random`: after a
restore, the next draw of each is the one that would have followed the save.
"""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def rng_state_json() -> Dict[str, Any]:
    """torch (CPU), numpy and Python RNG states as plain lists and numbers."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),  # a uint8 tensor: the generator's bytes
        "numpy": {"bit_generator": name, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state_json(state: Dict[str, Any]) -> None:
    """Restore what `rng_state_json()` returned (after a round trip through JSON)."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], np.array(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
