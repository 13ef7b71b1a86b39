"""The engine's two faces, shaped like vLLM's so its users feel at home.

    from moray.serve.engine import LLM, SamplingParams
    llm = LLM("runs/demo", max_num_seqs=16)              # an HF dir, a moray dir, or a training run
    outs = llm.generate(["def f(", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason

    engine = AsyncLLMEngine.from_path("runs/demo")
    async for out in engine.generate("r1", "def f(", SamplingParams(max_tokens=32)):
        ...                                                # one RequestOutput per new token
    await engine.abort("r1")                               # frees the request at once

The async engine runs the step loop on one background thread (the model's work
releases the GIL); requests come in and outputs go out through thread-safe queues.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import AsyncIterator, Dict, List, Optional, Sequence, Union

from moray.serve.engine.config import EngineConfig
from moray.serve.engine.core import EngineCore
from moray.serve.engine.outputs import RequestOutput
from moray.serve.engine.sampling import SamplingParams

Prompt = Union[str, Sequence[int]]


def _build_core(path: str, overrides: Dict) -> EngineCore:
    import torch

    from moray.serve.engine.loader import load_for_serving

    config = EngineConfig.from_overrides(overrides)
    dtype = getattr(torch, config.dtype) if config.dtype else None
    if config.gang_size > 1:
        return _build_gang_core(path, config, dtype)
    loaded = load_for_serving(path, dtype=dtype, device=config.device)
    return EngineCore(loaded.model, loaded.config, config, loaded.tokenizer)


def _build_gang_core(path: str, config: EngineConfig, dtype) -> EngineCore:
    """serve.pp x tp x ep > 1: the model lives in a gang of Ray stage actors (each reads only its
    own shard); this process keeps the scheduler, the KV block tables and the sampler."""
    import torch

    from moray.parallel.serving import ServeLayout, stage_report
    from moray.serve.engine.loader import LoadError, _tokenizer, open_source
    from moray.serve.engine.ray_executor import RayExecutor

    src = open_source(str(path))  # the config and tokenizer beside the weights; no tensor is read here
    layout = ServeLayout(pp=config.pp, tp=config.tp, ep=config.ep)
    layout.validate(src.cfg)
    blocks = config.kv_cache_blocks
    if blocks is None:  # the budget is per rank: the rank whose layers cost the most KV sets it
        elem = torch.empty((), dtype=dtype or torch.float32).element_size()
        per_token = max(s["kv_bytes_per_token"] for s in stage_report(src.cfg, layout, elem))
        blocks = int(config.kv_cache_memory_mb * 2**20) // (per_token * config.kv_block_size)
        if blocks < 2:
            raise LoadError(f"serve.kv_cache_memory_mb {config.kv_cache_memory_mb} holds {blocks} KV blocks per "
                            f"stage actor; raise it or set serve.kv_cache_blocks")
    executor = RayExecutor(str(path), src.cfg, layout, blocks, config.kv_block_size, dtype=dtype,
                           device=config.device, cpus_per_actor=config.cpus_per_actor)
    tok = _tokenizer(src, None)
    return EngineCore(None, src.cfg, config, tok, executor=executor)


def _tokens(core: EngineCore, prompt: Prompt) -> List[int]:
    if isinstance(prompt, str):
        if core.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass prompts as lists of token ids")
        return core.tokenizer.encode(prompt)
    return [int(t) for t in prompt]


class LLM:
    """Offline batched generation: every prompt is submitted at once and the engine runs to the end."""

    def __init__(self, path: str, **serve_overrides):
        self.core = _build_core(path, serve_overrides)
        self._ids = itertools.count()

    @classmethod
    def from_core(cls, core: EngineCore) -> "LLM":
        llm = cls.__new__(cls)
        llm.core, llm._ids = core, itertools.count()
        return llm

    def shutdown(self) -> None:
        """Release the executor's workers (a stage-actor gang); in process there is nothing to do."""
        self.core.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = False) -> List[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params; give one, or one each")
        order = []
        for prompt, p in zip(prompts, params):
            rid = f"offline-{next(self._ids)}"
            self.core.add_request(rid, _tokens(self.core, prompt), p,
                                  prompt=prompt if isinstance(prompt, str) else None)
            order.append(rid)
        done: Dict[str, RequestOutput] = {}
        while self.core.has_unfinished_requests():
            for out in self.core.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in order]


class AsyncLLMEngine:
    """Streaming generation for servers: requests arrive and leave while the engine runs."""

    def __init__(self, core: EngineCore):
        self.core = core
        self._inbox: "queue.Queue[tuple]" = queue.Queue()
        self._streams: Dict[str, tuple] = {}  # request id -> (asyncio queue, its loop)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: Optional[BaseException] = None  # set if the loop died: the server reports unhealthy
        self._thread = threading.Thread(target=self._run, name="moray-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_path(cls, path: str, **serve_overrides) -> "AsyncLLMEngine":
        return cls(_build_core(path, serve_overrides))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if not self.is_running:
            raise RuntimeError(f"the engine stopped: {self.error}" if self.error else "the engine was shut down")
        ids = _tokens(self.core, prompt)
        params.validate()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = (q, asyncio.get_running_loop())
        self._inbox.put(("add", request_id, ids, params, prompt if isinstance(prompt, str) else None))
        self._wake.set()
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            with self._lock:
                still_there = self._streams.pop(request_id, None) is not None
            if still_there:  # the caller went away before the end: free its KV blocks now
                self._inbox.put(("abort", request_id, None))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        """Free the request's KV blocks; returns once the engine thread has done it."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._inbox.put(("abort", request_id, lambda: loop.call_soon_threadsafe(done.set_result, None)))
        self._wake.set()
        if self._thread.is_alive():
            await done

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.core.shutdown()

    # ------------------------------------------------------------ the loop (engine thread)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.core.has_unfinished_requests():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                for out in self.core.step():
                    self._deliver(out.request_id, out)
        except BaseException as err:  # noqa: BLE001 - every waiting stream must hear of it
            self.error = err
        finally:  # stopped or failed: no stream may wait for outputs that will never come
            with self._lock:
                streams = list(self._streams)
            why = f"the engine stopped: {self.error}" if self.error is not None else "the engine was shut down"
            for rid in streams:
                self._deliver(rid, RuntimeError(why))

    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, prompt = cmd
                try:
                    self.core.add_request(rid, ids, params, prompt=prompt)
                except ValueError as err:  # the request is wrong: its caller hears why, the engine goes on
                    self._deliver(rid, err)
            else:
                _, rid, on_done = cmd
                self.core.abort_request(rid)
                if on_done is not None:
                    on_done()

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            q, loop = target
            loop.call_soon_threadsafe(q.put_nowait, item)
