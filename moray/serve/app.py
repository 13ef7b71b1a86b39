"""The Ray Serve application: ingress (FastAPI, OpenAI's API) -> LLM server replicas -> engine.

    serve run moray.serve.app:build_app checkpoint=runs/demo        # or: serve run configs/serve-tiny.yaml
    serve.run(build_app({"checkpoint": "runs/demo", "overrides": ["serve.max_num_seqs=8"]}))

`build_app(args)` is what a Serve config file's `import_path` (and a RayService) names;
its args are `AppArgs`. Settings are the config's `serve` section: a moray YAML
(`config`) and `serve.key=value` overrides; a Serve config file's `deployments:` entry
overrides the Ray options (replicas, autoscaling_config, ray_actor_options) by name.

    OpenAIIngress    the FastAPI app of moray/serve/openai/api.py; reads the API keys itself
    LLMServer        one per replica: an LLMServer (moray/serve/server.py) owning one engine,
                     in process or over a gang of stage actors; its check_health fails when
                     the engine (or its gang) is dead, so Serve replaces the replica

The ingress reaches the LLM servers through a DeploymentHandle (`stream=True` for
server-sent events) that talks gRPC straight to the replica and routes on the ingress's own
event loop: measured on 2 cores (bench/serve_http_hops.py), the hop there and the first chunk
back cost ~3.5-4 ms instead of ~6-7 ms with Serve's defaults (object references through Ray's
core worker, a router thread).
Closing a stream at the ingress (the client went away) cancels the handle's request, which
raises CancelledError inside the replica's generator, which closes the engine stream and
aborts the request. A non-streamed request whose replica dies is sent again to another
(generation is a pure function of the request); a stream is retried only before its first event.

/health and /metrics speak for the whole app: the ingress asks every LLM server replica
(`DeploymentHandle.broadcast`) and answers 503 only when none can serve; the metrics are
merged (moray/serve/openai/metrics.py). A replica whose engine runs on a stage-actor gang
(serve.pp / tp / ep > 1) reserves the gang's bundles in its own placement group, so Serve
places a replica only where its gang fits, and the gang goes when the replica goes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Dict, List, Optional

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from moray.serve.openai.api import build_api
from moray.serve.openai.errors import APIError, as_api_error, overloaded, unavailable
from moray.serve.openai.metrics import ReplicaTotals, render
from moray.serve.openai.serving import DONE, error_event
from moray.serve.server import LLMServer

log = logging.getLogger("moray.serve")

REPLICA_RETRIES = 2  # another replica, for a request whose replica died under it
INGRESS_MAX_ONGOING = 1024  # the ingress only relays; the LLM servers bound the work
BROADCAST_TIMEOUT_S = 10.0  # /health and /metrics wait this long for every replica's answer


class AppArgs(BaseModel):
    """The application's arguments (a Serve config file's `args:`)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str  # what the engine loads: an HF dir, a moray dir, or a training run / checkpoint
    draft: Optional[str] = None  # a draft model for speculative decoding (sets serve.draft_model)
    config: Optional[str] = None  # a moray YAML whose serve section is used
    overrides: List[str] = []  # "serve.key=value", applied last


def serve_settings(args: AppArgs):
    from moray.platform.config import load_config

    return load_config(args.config, list(args.overrides)).serve


@serve.deployment(name="LLMServer")
class LLMServerDeployment:
    def __init__(self, checkpoint: str, serve_cfg, draft: Optional[str] = None):
        replica = serve.get_replica_context().replica_id.unique_id
        self.replica = replica
        self.server = LLMServer.from_path(checkpoint, serve_cfg, draft, replica=replica)

    async def complete(self, request) -> str:
        return await self.server.complete(request)

    async def stream(self, request):
        async for event in self.server.stream(request):
            yield event

    async def health(self) -> dict:
        return await self.server.health()

    async def metrics_snapshot(self) -> dict:
        return await self.server.metrics_snapshot()

    async def model_card(self) -> dict:
        return await self.server.model_card()

    def stop_engine(self) -> str:
        self.server.stop_engine()
        return self.replica

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose engine died is replaced."""
        alive, reason = self.server.alive()
        if not alive:
            raise RuntimeError(f"the engine of replica {self.replica} is not running: {reason}")


def _cause(err: BaseException) -> BaseException:
    return err.cause if isinstance(err, RayTaskError) and getattr(err, "cause", None) is not None else err


def _retryable(err: BaseException) -> bool:
    return isinstance(err, (ActorDiedError, ActorUnavailableError, RayActorError))


def _translate(err: BaseException, retry_after_s: float = 1.0) -> APIError:
    if isinstance(err, BackPressureError):  # the handle's own queue (max_queued_requests) is full
        return overloaded(retry_after_s)
    if isinstance(err, DeploymentUnavailableError) or _retryable(err):
        return unavailable(f"no LLM server replica could take the request ({type(err).__name__}); retry shortly")
    return as_api_error(err)


def direct_handle(handle):
    """`handle` set up for the data path: routed on the caller's event loop (Serve's default is a
    router thread: two thread handoffs per call) and spoken over gRPC to the replica (Serve's
    default passes object references through Ray's core worker). What RAY_SERVE_THROUGHPUT_OPTIMIZED
    does for a whole cluster, here for this one handle. Serve LLM sets the loop the same way
    (`_init`); a handle already initialised keeps its loop."""
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=False)
    return handle.options(_by_reference=False)


class ServeEngineClient:
    """The LLM server deployment behind a DeploymentHandle, with LLMServer's methods; health and
    metrics are the whole deployment's."""

    def __init__(self, handle, retry_after_s: float = 1.0):
        self.handle, self.retry_after_s = direct_handle(handle), retry_after_s
        self.streams = self.handle.options(stream=True)
        self.totals = ReplicaTotals()

    async def _call(self, method: str, *args):
        for attempt in range(REPLICA_RETRIES + 1):
            response = getattr(self.handle, method).remote(*args)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()
                raise
            except Exception as err:  # noqa: BLE001 - every failure becomes an answer
                cause = _cause(err)
                if _retryable(cause) and attempt < REPLICA_RETRIES:
                    log.warning("an LLM server replica died under a request; sending it to another")
                    continue
                raise _translate(cause, self.retry_after_s) from None

    async def _everyone(self, method: str) -> List:
        """Every running replica's answer to `method` (an exception where one failed)."""
        try:
            return await self.handle.broadcast(method).results_async(timeout_s=BROADCAST_TIMEOUT_S,
                                                                      return_exceptions=True)
        except DeploymentUnavailableError:
            return []
        except TimeoutError:
            raise unavailable(f"the LLM server replicas did not all answer {method} in {BROADCAST_TIMEOUT_S:.0f} s; "
                              f"retry shortly") from None

    async def complete(self, request) -> str:
        return await self._call("complete", request)

    async def health(self) -> Dict:
        """The app's health: alive while some replica can serve; each replica's state besides."""
        states = [s for s in await self._everyone("health") if isinstance(s, dict)]
        alive = [s for s in states if s.get("alive")]
        if not states:
            reason = "no LLM server replica is running"
        else:
            reason = "; ".join(f"replica {s.get('replica')}: {s.get('reason')}" for s in states if not s.get("alive"))
        return {"alive": bool(alive), "reason": reason or "ok", "replicas": len(states), "replicas_alive": len(alive),
                "in_flight": sum(s["in_flight"] for s in states), "capacity": sum(s["capacity"] for s in alive),
                "replica_states": {s.get("replica"): s for s in states}}

    async def metrics_text(self) -> str:
        live = [s for s in await self._everyone("metrics_snapshot") if isinstance(s, dict)]
        return render(self.totals.update(live), live)

    async def model_card(self) -> dict:
        return await self._call("model_card")

    async def stream(self, request):
        for attempt in range(REPLICA_RETRIES + 1):
            events = self.streams.stream.remote(request)
            try:
                first = await events.__anext__()
                break
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                events.cancel()
                raise
            except Exception as err:  # noqa: BLE001
                cause = _cause(err)
                if _retryable(cause) and attempt < REPLICA_RETRIES:
                    continue
                raise _translate(cause, self.retry_after_s) from None
        finished = False
        try:
            yield first
            async for event in events:
                yield event
            finished = True
        except Exception as err:  # noqa: BLE001 - the stream already said 200: an error event ends it
            yield error_event(_translate(_cause(err), self.retry_after_s))
            yield DONE
            finished = True
        finally:
            if not finished:  # the client went away: cancel the replica's generator (aborts the request)
                events.cancel()


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=INGRESS_MAX_ONGOING,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress()
class OpenAIIngress:
    def __init__(self, llm_server, serve_cfg):
        self.client, self.serve_cfg = ServeEngineClient(llm_server, serve_cfg.retry_after_s), serve_cfg

    def __serve_build_asgi_app__(self):
        return build_api(self.client, self.serve_cfg)


def placement(cfg) -> Dict:
    """Serve options that reserve a replica's stage-actor gang with the replica: bundle 0 for the
    replica actor (serve.replica_cpus; with none, it rides in the gang's first bundle), then one
    per (stage, expert shard) as StageGang lays them out, which the gang finds and uses
    (moray/actors/serve_gang.py). In process (pp = tp = ep = 1): none."""
    if cfg.pp * cfg.tp * cfg.ep == 1:
        return {}
    from moray.actors.serve_gang import gang_bundles
    from moray.parallel.serving import ServeLayout

    gang = gang_bundles(ServeLayout(pp=cfg.pp, tp=cfg.tp, ep=cfg.ep), cfg.cpus_per_actor,
                        str(getattr(cfg, "device", "cpu")).startswith("cuda"))
    replica = [{"CPU": float(cfg.replica_cpus)}] if cfg.replica_cpus > 0 else []
    return {"placement_group_bundles": replica + gang, "placement_group_strategy": "PACK"}


def build_app(args) -> "serve.Application":
    """The application for `serve run`, a Serve config file's import_path and a RayService."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(dict(args or {}))
    cfg = serve_settings(args)
    capacity = cfg.max_num_seqs + cfg.max_queue
    llm = LLMServerDeployment.options(
        num_replicas=cfg.num_replicas,
        # Enough that every request the replica can admit reaches it, and a few over, which it
        # answers 429 itself; a queue at the handle (max_queued_requests) is bounded the same.
        max_ongoing_requests=capacity + 8,
        max_queued_requests=capacity,
        ray_actor_options={"num_cpus": cfg.replica_cpus},
        **placement(cfg),
    ).bind(args.checkpoint, cfg, args.draft)
    return OpenAIIngress.bind(llm, cfg)
