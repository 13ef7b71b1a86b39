"""The serving stage actor: one rank of a stage gang (one pipeline stage's slice of the layers,
its share of the experts, its tensor-parallel shard) and the KV cache of those layers.

    actor = ray.remote(StageActor).options(num_cpus=1, scheduling_strategy=...).remote()
    ray.get(actor.setup.remote(addr, port, rank, world, path, cfg_dict, layout, 256, 16, "float32", "cpu"))
    out = ray.get(actor.step.remote(chunks))   # StageOutput on each stage's (tp 0, ep 0) rank, else None

All the model work is `moray.parallel.serving.StageRunner` (torch.distributed only, no Ray):
this class only joins the process group, builds the runner and hands its outputs back.
Activations go stage to stage over torch.distributed (gloo on CPU, NCCL on GPU), not through
Ray: every rank gets the same step's chunks, and the tensors move rank to rank in the
runner's send/recv and all-to-all, which costs a copy over a socket (or NVLink) instead of
an object-store round trip through the driver. `step_handoff` is the same step as a node of a
Ray compiled graph, whose channels carry the activations instead (StageGang's transport
"cgraph"; measured, not the default: serve_gang.py says why).

The class is plain Python (StageGang wraps it with `ray.remote`), so it imports without
Ray and nothing heavy happens in `__init__`: a fresh actor is cheap to start, and an actor
can be killed at any moment (it owns nothing but its process: no files, no locks), which is
how the gang recovers from a dead peer that leaves the others stuck in a collective.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from datetime import timedelta
from typing import List, Optional

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StageActor:
    """One rank of the serving gang. Methods run one at a time, in the order the driver sent them
    (Ray's ordering for one caller), so the steps of a pipeline reach every rank in the same order."""

    def __init__(self):
        self.runner = None
        self.rank: Optional[int] = None
        self.steps = 0

    # ------------------------------------------------------------ rendezvous (rank 0)

    @staticmethod
    def node_ip() -> str:
        """The address the other ranks reach this one at (rank 0 hosts the TCP store)."""
        import ray

        return ray.util.get_node_ip_address()

    @staticmethod
    def free_port() -> int:
        """A port free on this node now, for the TCP store; init follows at once, so the race is short."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    # ------------------------------------------------------------ setup

    def setup(self, master_addr: str, master_port: int, rank: int, world_size: int, path: str,
              model_cfg, layout, num_blocks: int, block_size: int, dtype_name: Optional[str],
              device: str = "cpu", timeout_s: float = 300.0, threads: Optional[float] = None) -> dict:
        """Join the gang's process group and load this rank's shard of the weights from `path`.

        Collective: every rank of the gang calls it at once. `model_cfg` is a ModelConfig, its
        dict, or None (the runner reads it beside the weights). `timeout_s` bounds the rendezvous
        and every collective afterwards: a peer that dies mid-step is seen by the driver through
        Ray's actor death, and the gang kills this rank; the timeout only ends a wait nobody
        will end (the driver gone too). `threads`: torch threads (default: the CPUs Ray gave this
        actor; the gang passes its cpus_per_actor, since its actors reserve CPUs per bundle).
        """
        t0 = time.perf_counter()
        self.warm()
        import torch.distributed as dist

        from moray.model.config import ModelConfig
        from moray.parallel.serving import StageRunner

        t_import = time.perf_counter()
        self._set_threads(threads)
        gpu = str(device).startswith("cuda")
        if gpu:  # Ray made the assigned GPU this process's only visible one
            torch.cuda.set_device(0)
            device = "cuda:0"
        if isinstance(model_cfg, dict):
            model_cfg = ModelConfig.from_dict(model_cfg)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://{master_addr}:{master_port}",
                                    rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        t_group = time.perf_counter()
        dtype = _DTYPES[dtype_name] if dtype_name else None
        self.runner = StageRunner(path, model_cfg, layout, rank, num_blocks, block_size, dtype=dtype, device=device)
        self.rank = rank
        self._time_waits()
        # Where a (re)start's seconds go on this rank, for the gang's failure events.
        self.setup_seconds = {"import_s": t_import - t0, "group_s": t_group - t_import,
                              "load_s": time.perf_counter() - t_group}
        return self.info()

    def _time_waits(self) -> None:
        """Count the seconds this rank blocks receiving the previous stage's activations.

        StageOutput.seconds is the rank's wall time for a step, that wait included; the
        pipeline's busy fraction needs the compute alone (seconds - wait_seconds). The runner
        receives through its `_recv` (one call per step), so it is timed there; a runner whose
        StageOutput carries wait_seconds itself needs none of this."""
        recv = getattr(self.runner, "_recv", None)
        self._wait = 0.0
        if recv is None:
            return

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return recv(*args, **kwargs)
            finally:
                self._wait += time.perf_counter() - t0

        self.runner._recv = timed

    def _set_threads(self, threads: Optional[float]) -> None:
        """As many torch threads as CPUs this rank has: more only contend with the other ranks."""
        if threads is None:
            import ray

            threads = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(threads)))

    def warm(self) -> int:
        """Import what setup needs (seconds of CPU on a small machine), so a standby that the gang
        promotes after a failure only has to join the group and read its weights; returns the pid."""
        import torch.distributed  # noqa: F401

        import moray.parallel.serving  # noqa: F401
        import moray.platform.weights  # noqa: F401
        import moray.serve.engine.loader  # noqa: F401

        return os.getpid()

    # ------------------------------------------------------------ serving

    def step(self, chunks: List) -> Optional[object]:
        """Run this rank's part of one engine step; the StageOutput (tensors on the CPU, so the
        driver can read them without a GPU) on each stage's (tp 0, ep 0) rank, None elsewhere."""
        if self.runner is None:
            raise RuntimeError("step() before setup(): the gang must set every actor up first")
        self._wait = 0.0
        out = self.runner.step(chunks)
        self.steps += 1
        return self._output(out)

    def step_handoff(self, chunks: List, hidden=None) -> tuple:
        """step() as a node of the gang's Ray compiled graph (serve_graph.py): the previous stage's
        activations come in as `hidden` through the graph's channel, this stage's go out as the
        second value (StageRunner.step_handoff). The graph delivers `hidden` before the call, so the
        wait for the previous stage is not in this rank's seconds (wait_seconds 0)."""
        if self.runner is None:
            raise RuntimeError("step_handoff() before setup(): the gang must set every actor up first")
        self._wait = 0.0
        out, h = self.runner.step_handoff(chunks, hidden)
        self.steps += 1
        return self._output(out), h

    def _output(self, out):
        if out is None:
            return None
        cpu = {f: getattr(out, f).cpu() for f in ("logits", "expert_tokens") if getattr(out, f) is not None}
        out = dataclasses.replace(out, **cpu)
        if not hasattr(out, "wait_seconds"):
            out.wait_seconds = self._wait  # see _time_waits
        return out

    def reset_cache(self) -> None:
        self.runner.reset_cache()

    def info(self) -> dict:
        import ray

        r = self.runner
        return {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "stage": r.stage if r else None, "layers": [r.layers.start, r.layers.stop] if r else None,
                "weight_bytes": r.weight_bytes if r else 0, "kv_bytes_per_token": r.kv_bytes_per_token if r else 0,
                "dtype": str(r.dtype).replace("torch.", "") if r else None, "threads": torch.get_num_threads(),
                "setup_seconds": getattr(self, "setup_seconds", None), "steps": self.steps}


__all__ = ["StageActor"]
