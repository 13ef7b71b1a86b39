"""The inference engine: requests, the scheduler, the paged KV cache, sampling,
speculative decoding and the executors. No HTTP here, and no Ray outside the
Ray executor.

    from moray.serve.engine import LLM, SamplingParams
    outs = LLM("runs/demo").generate(["def f("], SamplingParams(max_tokens=32, temperature=0))

    request.py    Request: tokens known vs computed, status (an ordered enum)
    scheduler.py  decides: token budget, chunked prefill, preemption, the latency bound
    kv_cache.py   allocates: blocks, block tables, prefix hashes, LRU
    executor.py   runs the model (moray.model.paged) on one step's flat batch
    sampling.py   SamplingParams and the sampler
    speculative.py  the rejection sampler, the n-gram drafter
    core.py       one step: schedule -> execute -> sample -> update -> stop checks
    llm.py        LLM (offline, vLLM-shaped) and the async engine
    loader.py     one path: an HF dir, a moray dir, or a training run / checkpoint
"""

from moray.serve.engine.config import EngineConfig
from moray.serve.engine.llm import LLM, AsyncLLMEngine
from moray.serve.engine.outputs import CompletionOutput, RequestOutput
from moray.serve.engine.sampling import SamplingParams

__all__ = ["AsyncLLMEngine", "CompletionOutput", "EngineConfig", "LLM", "RequestOutput", "SamplingParams"]
