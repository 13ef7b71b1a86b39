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
server-sent events). Closing a stream at the ingress (the client went away) cancels
the handle's request, which raises CancelledError inside the replica's generator,
which closes the engine stream and aborts the request. A non-streamed request whose
replica dies is sent again to another (generation is a pure function of the request);
a stream is retried only before its first event.
"""

from __future__ import annotations

import asyncio
import logging
from typing import List, Optional

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from moray.serve.openai.api import build_api
from moray.serve.openai.errors import APIError, as_api_error, overloaded, unavailable
from moray.serve.openai.serving import DONE, error_event
from moray.serve.server import LLMServer

log = logging.getLogger("moray.serve")

REPLICA_RETRIES = 2  # another replica, for a request whose replica died under it
INGRESS_MAX_ONGOING = 1024  # the ingress only relays; the LLM servers bound the work


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
        return {**await self.server.health(), "replica": self.replica}

    async def metrics_text(self) -> str:
        return await self.server.metrics_text()

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


class ServeEngineClient:
    """The LLM server deployment behind a DeploymentHandle, with LLMServer's methods."""

    def __init__(self, handle, retry_after_s: float = 1.0):
        self.handle, self.retry_after_s = handle, retry_after_s
        self.streams = handle.options(stream=True)

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

    async def complete(self, request) -> str:
        return await self._call("complete", request)

    async def health(self) -> dict:
        return await self._call("health")

    async def metrics_text(self) -> str:
        return await self._call("metrics_text")

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
    ).bind(args.checkpoint, cfg, args.draft)
    return OpenAIIngress.bind(llm, cfg)
