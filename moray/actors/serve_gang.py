"""A gang of serving stage actors in one placement group: started together, watched together,
rebuilt together.

    gang = StageGang(path, model_cfg, layout, num_blocks=256, block_size=16)
    gang.start()                        # placement group, actors, process group, weights
    step = gang.submit(chunks)          # every rank gets the same chunks (one object-store copy)
    outputs = gang.wait(step)           # per rank: StageOutput on each stage's (tp 0, ep 0) rank, else None
    gang.shutdown()

Placement: one bundle per (stage, expert shard) holding that shard's tp ranks, strategy PACK,
so a tensor-parallel group, whose all-reduces run every layer, always shares a node, while
stages and expert shards (one send per step, one all-to-all per MoE layer) may spread over
nodes when one node cannot hold the gang. Ranks follow ParallelDims' order,
rank = (pp_i * ep + ep_i) * tp + tp_i, so bundle i holds ranks i * tp .. i * tp + tp - 1.
A caller that runs in a placement group ending with exactly these bundles (a Ray Serve replica
whose deployment reserved its gang, moray/serve/app.py) has the gang placed there: reserved
with the caller, and removed with it; otherwise the gang makes a placement group of its own.

Liveness is Ray's: a step's refs are waited on together (`ray.wait`), so the death of any rank,
or of its node, surfaces as that rank's actor-death error even while the other ranks sit in a
recv waiting for it. No timeout guesses a death. The survivors may be stuck in gloo, so the
whole gang goes: every rank is killed and a fresh gang is set up, each rank reloading its own
shard from `path`; the KV cache is empty again, so the caller must recompute its sequences.
`GangFailure` says what died and what the rebuild cost, and `events` keeps the story. (The
serving engine turns GangFailure into its ExecutorFailure: actors never import serve.)

Rebuilding fast: a fresh process spends seconds starting Ray's worker and importing torch
(~8 s of CPU per rank on a 2-core machine; setup itself, joining the group and reading a
small model, under 1 s). So the placement group outlives a failure (Ray re-places the bundles
of a lost node by itself) and each rank has a standby in its bundle, a process that has
imported everything and holds nothing; the rebuild promotes the live standbys and starts
fresh processes only for those lost with a node. A rebuild that fails anyway is tried once
more from nothing: a new placement group and new processes.

The data path, and why torch.distributed. Activations go stage to stage by the runners' gloo
send/recv (NCCL on GPUs) and the driver calls every rank once per step. The other way is
`transport="cgraph"`: each step one Ray compiled graph over the same actors (serve_graph.py;
the same outputs, deaths seen the same way). bench/serve_stages.py measures both, one gang at
a time on 2 shared cores (2026-12-04, load average 9-19; bench/results/serve_stages.json):
- one (T, D) hop, decode batches 1/16/64 and a 512-token chunk, d_model 256 and 1024, bf16 and
  fp32: gloo 0.07-0.86 ms, a compiled graph's channel 4.8-18x that (median 6.6x; Ray's
  tensor transport over shared memory 2.2-13x);
- a pp 2 decode step at batch 16: 42.1 ms over gloo against 105.1 ms through the graph with
  one step in flight, 92.9 against 105.5 ms with two; what the engine serves, greedy tokens/s
  with up to 16 and 8 sequences a step: the graph 0.73x and 0.43x of gloo's (three earlier runs
  under load average 16-25 put the one-step figure at 0.79x-1.53x, the engine at 0.40x-0.98x);
- waiting costs: two idle actors in a compiled graph use 0.28 CPU-seconds per second polling
  their channels, against 0.013 for plain actors, taken from the stage that computes when
  stages share cores.
So gloo stays the default. Ray 2.60's graph has sharp edges besides: teardown() hangs once ~1 MB
has gone through a channel unless the actors are killed first (StepGraph.close is called after
the kills), ray.get of its refs times out after 10 s unless told otherwise, and an actor runs
one graph at a time. On GPUs (NCCL channels both ways) it is not measured yet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from moray.actors.serve_stage import StageActor

log = logging.getLogger(__name__)
TRANSPORTS = ("gloo", "cgraph")


class GangFailure(RuntimeError):
    """A rank died mid-step; the gang has been rebuilt (empty KV cache) and the step is void."""

    def __init__(self, cause: str, rank: Optional[int], rebuild_seconds: float):
        super().__init__(f"{cause} (gang rebuilt in {rebuild_seconds:.1f} s)")
        self.cause, self.rank, self.rebuild_seconds = cause, rank, rebuild_seconds


class GangStartError(RuntimeError):
    """The gang could not be (re)built: too few resources, or a rank failed while setting up."""


@dataclass
class GangStep:
    """One submitted step: a ref per rank (rank order), and the gang generation it was sent to."""

    refs: List[Any]
    generation: int
    submitted_at: float  # time.perf_counter() at submit
    graph_ref: Any = None  # transport "cgraph": the compiled graph's ref (refs is empty)
    graph_error: Optional[BaseException] = None  # ... or why the graph refused the step (a rank died)


def gang_bundles(layout, cpus_per_actor: float, gpu: bool) -> List[Dict[str, float]]:
    """One bundle per (stage, expert shard), holding its tp ranks (so they land on one node)."""
    b = {"CPU": float(layout.tp * cpus_per_actor)}
    if gpu:
        b["GPU"] = float(layout.tp)
    return [dict(b) for _ in range(layout.pp * layout.ep)]


def _is_death(err: Exception) -> bool:
    """A system failure of the rank (its process or node gone), as opposed to an error its code raised."""
    import ray.exceptions as rex

    return isinstance(err, rex.RayError) and not isinstance(err, rex.RayTaskError)


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already dead, or its node is gone
        pass


def _death_reason(err: Exception) -> str:
    """The one line of Ray's actor-death message that says why (killed, node died, OOM...)."""
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    why = [l for l in lines if not l.startswith(("The actor died unexpectedly", "class_name:", "actor_id:",
                                                  "pid:", "name:", "namespace:", "ip:"))]
    return f"{type(err).__name__}: {(why or lines or ['no reason given'])[0]}"


class StageGang:
    def __init__(self, path: str, model_cfg, layout, num_blocks: int, block_size: int,
                 dtype_name: Optional[str] = None, device: str = "cpu", cpus_per_actor: int = 1,
                 start_timeout_s: float = 120.0, collective_timeout_s: float = 300.0,
                 stuck_grace_s: float = 10.0, standby: bool = True, actor_cls: type = StageActor,
                 transport: str = "gloo"):
        """model_cfg: a ModelConfig (or None: each actor reads it beside the weights).
        start_timeout_s bounds placement and setup; collective_timeout_s is the process group's
        (a wait nobody will end); stuck_grace_s is how long the other ranks get to finish once one
        rank's code raised, before the gang counts as wedged and is rebuilt. standby: keep one warm
        spare process per rank (torch imported, nothing loaded) so a rebuild skips process start-up
        (CPU only). actor_cls: StageActor or a subclass (a test's fault injection). transport: how
        activations go stage to stage, "gloo" (torch.distributed send/recv, NCCL on GPUs; the
        default, see the module doc) or "cgraph" (a Ray compiled graph, serve_graph.py)."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r}: expected one of {TRANSPORTS}")
        self.path, self.layout = str(path), layout
        self.model_cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype_name, self.device, self.cpus_per_actor = dtype_name, str(device), cpus_per_actor
        self.start_timeout_s, self.collective_timeout_s = start_timeout_s, collective_timeout_s
        self.stuck_grace_s, self.actor_cls, self.transport = stuck_grace_s, actor_cls, transport
        self.graph = None  # transport "cgraph": the StepGraph over the current actors
        self.world_size = layout.pp * layout.ep * layout.tp
        self.actors: List[Any] = []
        self.use_standby = standby and not self.device.startswith("cuda")
        self.standby: List[Tuple[Any, Any]] = []  # (actor, its warm() ref): one per rank, in its bundle
        self.infos: List[dict] = []  # StageActor.info() per rank, after setup
        self.pg = None
        self.pg_offset = 0  # the gang's first bundle in self.pg
        self.owns_pg = True  # False: the caller's placement group (not ours to remove)
        self.generation = 0  # bumped by every (re)start; steps of older generations are void
        self.events: List[Dict[str, Any]] = []
        self.start_seconds: Optional[float] = None
        self.start_breakdown: Dict[str, float] = {}

    # ------------------------------------------------------------ layout

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    def bundles(self) -> List[Dict[str, float]]:
        return gang_bundles(self.layout, self.cpus_per_actor, self.gpu)

    def _caller_placement(self):
        """(placement group, offset) when the caller's placement group ends with the gang's bundles."""
        from ray.util import get_current_placement_group

        pg = get_current_placement_group()
        if pg is None:
            return None, 0
        need, have = self.bundles(), pg.bundle_specs
        tail = have[len(have) - len(need):] if len(have) >= len(need) else []
        if tail and all({k: float(v) for k, v in h.items() if v} == n for h, n in zip(tail, need)):
            return pg, len(have) - len(need)
        log.info("the caller's placement group %s does not end with the gang's bundles %s: the gang makes its own",
                 have, need)
        return None, 0

    def coords(self, rank: int) -> Dict[str, int]:
        tp, ep = self.layout.tp, self.layout.ep
        return {"pp": rank // (tp * ep), "ep": (rank // tp) % ep, "tp": rank % tp}

    def _name(self, rank: int) -> str:
        c = self.coords(rank)
        return f"rank {rank} (stage {c['pp']}, ep {c['ep']}, tp {c['tp']})"

    # ------------------------------------------------------------ start / stop

    def start(self) -> float:
        """Place, start and set up every rank; seconds taken. Raises GangStartError on failure
        (after cleaning up whatever it had started). After a failure the placement group is kept
        (Ray moves the bundles of a lost node by itself) and warm standbys become the new ranks."""
        t0 = time.perf_counter()
        if self.pg is None:
            self.pg, self.pg_offset = self._caller_placement()
            self.owns_pg = self.pg is None
        if self.pg is None:
            self._check_fits()
            from ray.util import placement_group

            self.pg = placement_group(self.bundles(), strategy="PACK")
        if not self.pg.wait(self.start_timeout_s):
            msg = self._resources("could not place the gang in %.0f s" % self.start_timeout_s)
            self._teardown()
            raise GangStartError(msg)
        t_placed = time.perf_counter()
        spares = self._take_standbys()
        self.actors = [a if a is not None else self._spawn(r, rank=True) for r, a in enumerate(spares)]
        t_spawned = time.perf_counter()
        try:
            addr, port = self._gather([self.actors[0].node_ip.remote(), self.actors[0].free_port.remote()],
                                      "rendezvous")
            t_up = time.perf_counter()
            cfg = self.model_cfg
            self.infos = self._gather([a.setup.remote(addr, port, r, self.world_size, self.path, cfg, self.layout,
                                                      self.num_blocks, self.block_size, self.dtype_name,
                                                      self.device, self.collective_timeout_s, self.cpus_per_actor)
                                       for r, a in enumerate(self.actors)], "setup")
            if self.transport == "cgraph":
                self.graph = self._compile()
        except GangStartError:
            self._teardown()
            raise
        self.generation += 1
        t_end = time.perf_counter()
        self.start_seconds = t_end - t0
        # Where a start goes: placing the bundles, taking standbys, the rank processes coming up
        # (fresh ones import torch), then setup (join the process group, read the weights).
        self.start_breakdown = {"place_s": t_placed - t0, "standby_s": t_spawned - t_placed,
                                "actors_s": t_up - t_spawned, "setup_s": t_end - t_up,
                                "standbys_used": sum(a is not None for a in spares)}
        log.info("stage gang %d up in %.1f s (%s): %s", self.generation, self.start_seconds,
                 ", ".join(f"{k} {v:.1f}" for k, v in self.start_breakdown.items()), self.describe())
        self.standby = [self._spawn(r, rank=False) for r in range(self.world_size)] if self.use_standby else []
        return self.start_seconds

    def _spawn(self, r: int, rank: bool):
        """An actor in rank r's bundle: a rank now, or a standby that warms up (imports) and waits.

        On the CPU every actor asks for no CPU of its own: the bundle reserves the rank's CPUs for
        the gang, so a standby can be promoted without moving resources, and its torch threads
        are set from cpus_per_actor instead. A GPU rank asks for its GPU (that is how Ray hands
        it a device), and a GPU gang keeps no standbys."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = self.pg_offset + r // self.layout.tp
        where = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle)
        actor = ray.remote(self.actor_cls).options(num_cpus=0, num_gpus=1 if self.gpu and rank else 0,
                                                   max_restarts=0, max_task_retries=0,
                                                   scheduling_strategy=where).remote()
        return actor if rank else (actor, actor.warm.remote())

    def _take_standbys(self) -> List[Any]:
        """The standbys that are alive and warm, by rank (None where a fresh actor is needed: its
        node died with it). Waiting for one still warming beats starting a process from nothing."""
        import ray

        spares, self.standby = self.standby, []
        if not spares:
            return [None] * self.world_size
        refs = [ref for _, ref in spares]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout_s / 2)
        out = []
        for a, ref in spares:
            try:
                ok = ref in ready and ray.get(ref) is not None
            except Exception:  # noqa: BLE001 - died with its node: replaced by a fresh actor
                ok = False
            if not ok:
                _kill(a)
            out.append(a if ok else None)
        return out

    def wait_standby(self, timeout: Optional[float] = None) -> int:
        """Block until the standbys have warmed up (they import in the background and compete for
        the CPU meanwhile: a benchmark waits for them); how many are warm."""
        import ray

        refs = [ref for _, ref in self.standby]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
        return len(ready)

    def _compile(self):
        from moray.actors.serve_graph import StepGraph

        try:
            return StepGraph(self.actors, self.layout, max_inflight=max(2, self.layout.pp),
                             transport="accelerator" if self.gpu else None)
        except Exception as e:  # noqa: BLE001 - whatever Ray raised, with what to do
            raise GangStartError(f"stage gang: the compiled graph did not compile ({type(e).__name__}: {e}); "
                                 f"use transport='gloo'") from e

    def _gather(self, refs: List[Any], what: str) -> List[Any]:
        """ray.get with the start timeout, naming the rank that failed."""
        import ray

        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout_s)
        if pending:
            ranks = [i for i, r in enumerate(refs) if r in pending]
            raise GangStartError(f"stage gang {what}: ranks {ranks} did not answer in {self.start_timeout_s:.0f} s")
        out = []
        for i, r in enumerate(refs):
            try:
                out.append(ray.get(r))
            except Exception as e:  # noqa: BLE001 - reported with the rank, whatever it is
                raise GangStartError(f"stage gang {what}: {self._name(i)} failed: {e}") from e
        return out

    def _check_fits(self) -> None:
        """Fail at once, naming what is needed, if no node could hold a bundle or the cluster is too small."""
        import ray

        need = self.bundles()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        per_node_ok = any(all(res.get(k, 0) >= v for k, v in need[0].items()) for res in nodes)
        total = {k: sum(res.get(k, 0) for res in nodes) for k in need[0]}
        enough = all(total[k] >= v * len(need) for k, v in need[0].items())
        if not (per_node_ok and enough):
            raise GangStartError(self._resources("the cluster cannot hold the gang"))

    def _resources(self, what: str) -> str:
        import ray

        need, n = self.bundles(), len(self.bundles())
        want = ", ".join(f"{v * n:g} {k}" for k, v in need[0].items())
        have = ray.cluster_resources()
        free = ray.available_resources()
        nodes = [n_["Resources"] for n_ in ray.nodes() if n_.get("Alive")]
        biggest = max((r.get("CPU", 0) for r in nodes), default=0)
        return (f"{what}: pp {self.layout.pp} x ep {self.layout.ep} x tp {self.layout.tp} at {self.cpus_per_actor} "
                f"CPU per actor needs {want} in {n} bundles of {need[0]} (each bundle on one node); the cluster has "
                f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs ({free.get('CPU', 0):g} CPUs, "
                f"{free.get('GPU', 0):g} GPUs free) on {len(nodes)} nodes, the largest with {biggest:g} CPUs; "
                f"add nodes, lower cpus_per_actor, or use a smaller layout")

    def _teardown(self, keep_placement: bool = False) -> None:
        """Kill every rank (they may be stuck in a collective); unless keep_placement, also the
        standbys and the placement group."""
        from ray.util import remove_placement_group

        for a in self.actors:
            _kill(a)
        self.actors = []
        if self.graph is not None:  # after the kills: a loop stuck behind a dead peer never ends
            self.graph.close()
            self.graph = None
        if keep_placement:
            return
        for a, _ in self.standby:
            _kill(a)
        self.standby = []
        if self.pg is not None and self.owns_pg:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - removed already
                pass
        self.pg = None

    def shutdown(self) -> None:
        self._teardown()
        self.infos = []

    @property
    def alive(self) -> bool:
        return bool(self.actors)

    def describe(self) -> List[dict]:
        return [{**self.coords(i["rank"]), "rank": i["rank"], "node_id": i["node_id"], "pid": i["pid"],
                 "layers": i["layers"], "weight_bytes": i["weight_bytes"],
                 "kv_bytes_per_token": i["kv_bytes_per_token"]} for i in self.infos]

    # ------------------------------------------------------------ steps

    def submit(self, chunks: list) -> GangStep:
        import ray

        if not self.actors:
            raise GangStartError("the stage gang is not running (start() it, or it was shut down)")
        if self.graph is not None:
            from ray.exceptions import RayCgraphCapacityExceeded, RayError

            step = GangStep([], self.generation, time.perf_counter())
            try:
                step.graph_ref = self.graph.submit(chunks)
            except RayCgraphCapacityExceeded:  # more steps in flight than the graph was built for: a caller's bug
                raise
            except RayError as e:  # its channels closed: a rank died since the last step (seen in wait)
                step.graph_error = e
            return step
        ref = ray.put(chunks)  # one copy in the object store, read by every rank
        return GangStep([a.step.remote(ref) for a in self.actors], self.generation, time.perf_counter())

    def wait(self, step: GangStep) -> List[Any]:
        """Every rank's output for `step`, in rank order. A rank's death: rebuild, raise GangFailure.
        An error raised by the ranks' code (a bad batch) is re-raised as is, the gang intact."""
        import ray

        if step.generation != self.generation:
            raise GangFailure(f"step sent to gang {step.generation}, which was rebuilt as {self.generation}: "
                              f"void", None, 0.0)
        if step.graph_ref is not None or step.graph_error is not None:
            from moray.actors.serve_graph import GraphBroken

            try:
                if step.graph_error is not None:
                    raise self.graph.broken(step.graph_error)
                return self.graph.get(step.graph_ref)
            except GraphBroken as b:
                self._fail(b.cause if b.rank is None else f"{self._name(b.rank)} died: {b.cause}", b.rank)
        rank_of = {ref: r for r, ref in enumerate(step.refs)}
        outputs: List[Any] = [None] * len(step.refs)
        errors: Dict[int, Exception] = {}
        pending = list(step.refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=self.stuck_grace_s if errors else None)
            if not ready:  # a rank raised and the rest still wait in a collective for it
                r, e = min(errors.items())
                stuck = sorted(rank_of[p] for p in pending)
                self._fail(f"{self._name(r)} raised {type(e).__name__} and ranks {stuck} are stuck "
                           f"waiting for it", r)
            for ref in ready:
                r = rank_of[ref]
                try:
                    outputs[r] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - sorted below
                    if _is_death(e):
                        self._fail(f"{self._name(r)} died: {_death_reason(e)}", r)
                    errors[r] = e
        if errors:
            raise errors[min(errors)]
        return outputs

    def _fail(self, cause: str, rank: Optional[int]) -> None:
        """Rebuild the gang from scratch and raise GangFailure (GangStartError if it cannot)."""
        detected_at = time.time()
        info = next((i for i in self.infos if i["rank"] == rank), {}) if rank is not None else {}
        log.warning("stage gang %d failed: %s; rebuilding", self.generation, cause)
        t0 = time.perf_counter()
        self._teardown(keep_placement=True)
        event = {"cause": cause, "rank": rank, "coords": self.coords(rank) if rank is not None else None,
                 "node_id": info.get("node_id"), "pid": info.get("pid"), "detected_at": detected_at,
                 "generation": self.generation}
        try:
            try:
                self.start()
            except GangStartError as e:  # once more from nothing: a fresh placement, fresh processes
                log.warning("stage gang rebuild failed (%s); retrying with a new placement group", e)
                self._teardown()
                self.start()
        except GangStartError as e:
            event.update(rebuild_seconds=time.perf_counter() - t0, rebuilt=False, error=str(e))
            self.events.append(event)
            log.error("stage gang could not be rebuilt after %s: %s", cause, e)
            raise
        secs = time.perf_counter() - t0
        event.update(rebuild_seconds=secs, rebuilt=True, new_generation=self.generation,
                     standbys_used=self.start_breakdown.get("standbys_used", 0), breakdown=self.start_breakdown)
        self.events.append(event)
        log.warning("stage gang rebuilt as %d in %.1f s after: %s", self.generation, secs, cause)
        raise GangFailure(cause, rank, secs)


__all__ = ["StageGang", "GangStep", "GangFailure", "GangStartError"]
