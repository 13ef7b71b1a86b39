"""A gang's engine steps as one Ray Compiled Graph: the other way activations can go stage to stage.

    graph = StepGraph(gang.actors, layout, max_inflight=2)
    ref = graph.submit(chunks)        # every rank's node runs, stage s's activations feed stage s + 1's
    outputs = graph.get(ref)          # per rank, as StageGang.wait returns them; GraphBroken if a rank died
    graph.close()

Each rank is a node, `StageActor.step_handoff(chunks, hidden)`: every node reads the step's
chunks from the graph's input, a stage s > 0 node reads the (T, D) activations of the rank with
the same (ep, tp) coordinates in stage s - 1, and the outputs of every rank come back together.
Inside a stage, tokens still reach their experts and tensor shards reduce over torch.distributed
(the process group the gang set up): the graph replaces the driver's per-rank actor calls and
the stage-to-stage sends, nothing else. On the CPU the channels are Ray's shared memory; on GPUs
`with_tensor_transport` would carry the activations over NCCL.

bench/serve_stages.py measures this against the gang's torch.distributed path; the gang uses the
graph only when asked (`StageGang(..., transport="cgraph")`): see serve_gang.py for which is the
default and why.

Death: when a rank's process dies, the wait for the step's outputs ends at once with Ray's
ActorDiedError for it (the same error the gloo path waits on; its actor id names the rank), or,
once Ray's own monitor of the graph has seen the death and closed the channels, with a channel
error, and then the rank and its death message are read from the graph's per-actor loop tasks.
Either way `get` raises GraphBroken naming them (`broken` does the same for the error of a
step submitted after the death, which StageGang keeps for its wait). No timeout decides a death.
"""

from __future__ import annotations

import time
from typing import Any, List, Optional

# Channels sized up front for a large step's activations (a 512-token chunk at d_model 8192 in
# bf16 is 8 MiB): in Ray 2.60 a channel that has grown past ~1 MB left teardown() hanging.
BUFFER_BYTES = 16 << 20
NAMING_WAIT_S = 5.0  # how long a broken graph's loops get to tell which rank died


class GraphBroken(RuntimeError):
    """A rank of the graph died (or the graph could not run): the gang must be rebuilt."""

    def __init__(self, cause: str, rank: Optional[int], error: Optional[BaseException] = None):
        super().__init__(cause)
        self.cause, self.rank, self.error = cause, rank, error


class StepGraph:
    def __init__(self, actors: List[Any], layout, max_inflight: int, buffer_bytes: int = BUFFER_BYTES,
                 transport: Optional[str] = None):
        """actors: the gang's ranks in rank order (set up). transport: with_tensor_transport's
        argument for the activations ("shm", "nccl", ...), None for Ray's default channel."""
        from ray.dag import InputNode, MultiOutputNode

        self.actors, self.layout = list(actors), layout
        rank_of = {a._actor_id: r for r, a in enumerate(self.actors)}
        self._rank_of_actor = rank_of
        outs: List[Any] = [None] * len(self.actors)
        with InputNode() as chunks:
            prev = {}  # (ep, tp) -> the previous stage's activations node
            for s in range(layout.pp):
                nxt = {}
                for e in range(layout.ep):
                    for t in range(layout.tp):
                        r = layout.rank_of(s, e, t)
                        step = self.actors[r].step_handoff
                        args = (chunks,) if s == 0 else (chunks, prev[e, t])
                        if s < layout.pp - 1:
                            out, hidden = step.options(num_returns=2).bind(*args)
                            nxt[e, t] = hidden.with_tensor_transport(transport) if transport else hidden
                        else:
                            out = step.bind(*args)  # (output, None): the last stage passes nothing on
                        outs[r] = out
                prev = nxt
            dag = MultiOutputNode(outs)
        self.dag = dag.experimental_compile(_max_inflight_executions=max_inflight, _buffer_size_bytes=buffer_bytes)
        self._last = {r for r in range(len(self.actors)) if layout.coords(r).pp == layout.pp - 1}

    def submit(self, chunks: list):
        return self.dag.execute(chunks)

    def get(self, ref) -> List[Any]:
        """Every rank's StageOutput (or None), in rank order, as StageGang.wait gives them. A rank's
        code raising is re-raised as is; a dead rank (or a graph that broke) raises GraphBroken."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        try:
            values = ray.get(ref, timeout=-1)  # no timeout: a death ends the wait (see above)
        except RayTaskError:  # the ranks' code raised: the gang is intact
            raise
        except RayError as e:  # the dead actor's error itself, or the channels it closed
            raise self.broken(e) from e
        return [v[0] if r in self._last else v for r, v in enumerate(values)]

    def broken(self, err: BaseException) -> GraphBroken:
        """Which rank's death broke the graph: the error itself when it is an actor's death (its
        actor id names the rank), else the first of Ray's per-actor loop tasks that died."""
        import ray

        from moray.actors.serve_gang import _death_reason, _is_death

        if _is_death(err) and getattr(err, "actor_id", None):
            r = next((r for r, a in enumerate(self.actors) if a._actor_id.hex() == err.actor_id), None)
            if r is not None:
                return GraphBroken(_death_reason(err), r, err)
        # The survivors' loops may never end (stuck behind the dead peer): take the loops as they
        # end, and stop at the first death. The bound only limits the naming, never the detection.
        loops = {ref: actor for actor, ref in (getattr(self.dag, "worker_task_refs", {}) or {}).items()}
        pending, deadline = list(loops), time.monotonic() + NAMING_WAIT_S
        while pending and time.monotonic() < deadline:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001 - sorted by _is_death
                    if _is_death(e):
                        r = self._rank_of_actor.get(loops[ref]._actor_id)
                        return GraphBroken(_death_reason(e), r, e)
        return GraphBroken(f"the compiled graph broke ({type(err).__name__}: {err}) with no rank dead", None, err)

    def close(self) -> None:
        """Tear the graph down; after killing its actors, where they may be stuck (a dead peer): in
        Ray 2.60 teardown() waits for every actor's loop, and a loop blocked in a read never ends."""
        try:
            self.dag.teardown()
        except Exception:  # noqa: BLE001 - a graph whose actors are gone tears down with errors
            pass


__all__ = ["StepGraph", "GraphBroken", "BUFFER_BYTES"]
