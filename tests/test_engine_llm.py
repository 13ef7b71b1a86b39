"""The engine end to end on a tiny Mixtral: continuous batching over the paged cache gives
every request what it gets decoded alone and what Hugging Face `generate` gives; a tiny
KV budget preempts without changing outputs; the async engine streams and aborts."""

from __future__ import annotations

import asyncio

import pytest
import torch

from moray.model import ModelConfig, build_model
from moray.model.hf import save_hf_dir
from moray.serve.engine.config import EngineConfig
from moray.serve.engine.core import EngineCore
from moray.serve.engine.llm import LLM, AsyncLLMEngine
from moray.serve.engine.sampling import SamplingParams

CFG = ModelConfig(vocab_size=320, d_model=128, n_layers=2, n_heads=4, n_kv_heads=1, ffn_hidden=128,
                  mlp="swiglu", n_experts=4, top_k=2, max_seq_len=256, init_std=0.1)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=7).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 256, (40,), generator=g).tolist()  # a common prefix: 2 full blocks of 16 and more
    lens = [5, 23, 40, 61, 9, 33]
    out = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]
    return out + [shared + [1, 2, 3], shared + [4, 5, 6, 7, 8]]


def _core(model, **kw) -> EngineCore:
    return EngineCore(model, CFG, EngineConfig(**{"kv_block_size": 16, "kv_cache_blocks": 64, **kw}))


def _alone(model, prompt):
    return LLM.from_core(_core(model)).generate([prompt], GREEDY)[0].token_ids


def _staggered(core: EngineCore, prompts, params):
    """Requests arrive over time: one more every other step, while earlier ones run."""
    pending = list(enumerate(prompts))
    done = {}
    step = 0
    while pending or core.has_unfinished_requests():
        if pending and step % 2 == 0:
            i, p = pending.pop(0)
            core.add_request(f"r{i}", p, params)
        for out in core.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return [done[f"r{i}"] for i in range(len(prompts))]


def test_continuous_batching_with_chunked_prefill_and_prefix_hits_equals_each_alone(model, prompts):
    core = _core(model, max_batch_tokens=32, max_num_seqs=4)  # a 61-token prompt takes two chunks
    outs = _staggered(core, prompts, GREEDY)
    for p, out in zip(prompts, outs):
        assert out.token_ids == _alone(model, p)
        assert out.finish_reason == "length" and len(out.token_ids) == GREEDY.max_tokens
    assert outs[-1].metrics.num_cached_tokens >= 32  # the second shared-prefix request hit 2 blocks
    assert core.stats.prefix_cache_hits >= 32


def test_greedy_equals_hugging_face_generate(model, prompts, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_hf_dir(tmp_path / "hf", CFG, model.state_dict())
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    llm = LLM(str(tmp_path / "hf"), kv_block_size=16, kv_cache_blocks=64, max_batch_tokens=64)
    ours = llm.generate(prompts[:4], GREEDY)
    for p, out in zip(prompts[:4], ours):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
        assert out.token_ids == ref


def test_a_tiny_kv_budget_preempts_and_changes_nothing(model, prompts):
    big = LLM.from_core(_core(model)).generate(prompts, GREEDY)
    # 8 blocks of 16 = 128 slots for 8 requests of up to 73 tokens: most must wait or be preempted.
    core = _core(model, kv_cache_blocks=8, max_batch_tokens=64)
    small = LLM.from_core(core).generate(prompts, GREEDY)
    assert [o.token_ids for o in small] == [o.token_ids for o in big]
    assert core.stats.num_preemptions > 0 or sum(o.metrics.num_preemptions for o in small) > 0


def test_kv_bytes_per_token_equal_the_planners(model):
    from moray.platform.planner.inference import kv_cache_bytes_per_token

    core = _core(model, dtype="bfloat16")
    assert core.executor.kv_bytes_per_token == kv_cache_bytes_per_token(CFG, 2)


def test_seeded_sampling_is_reproducible_and_n_gives_n_completions(model, prompts):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=11, n=3, ignore_eos=True)
    a = LLM.from_core(_core(model)).generate(prompts[:2], params)
    b = LLM.from_core(_core(model)).generate(prompts[:2] + prompts[2:5], params)[:2]
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    assert all(len(o.outputs) == 3 for o in a)


def test_the_async_engine_streams_tokens_and_aborts(model, prompts):
    engine = AsyncLLMEngine(_core(model))

    async def main():
        streamed = [out.token_ids[:] async for out in engine.generate("s1", prompts[0], GREEDY)]
        long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        got = 0
        async for out in engine.generate("s2", prompts[1], long):
            got = len(out.token_ids)
            if got >= 3:
                await engine.abort("s2")
                break
        return streamed, got

    try:
        streamed, got = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [len(t) for t in streamed] == list(range(1, GREEDY.max_tokens + 1))
    assert streamed[-1] == _alone(model, prompts[0])
    assert got == 3 and not engine.core.has_unfinished_requests()
    assert engine.core.kv.usage == 0.0  # the aborted request's blocks are free


def test_the_serve_section_configures_the_engine(model):
    from moray.platform.config import load_config
    from moray.platform.planner.inference import kv_cache_bytes_per_token

    serve = load_config("configs/tiny.yaml", ["serve.max_num_seqs=3", "serve.kv_cache_blocks=40",
                                              "serve.speculative_method=ngram"]).serve
    cfg = EngineConfig.from_serve(serve)
    assert (cfg.max_num_seqs, cfg.kv_cache_blocks, cfg.speculative_method, cfg.dtype) == (3, 40, "ngram", "bfloat16")
    core = EngineCore(model, CFG, cfg)
    assert core.executor.kv_bytes_per_token == kv_cache_bytes_per_token(CFG, 2)  # as moray plan counts it


def test_n_samples_share_the_prompt_blocks_from_the_first_step(model):
    """n = 4 on a 64-token prompt (4 full blocks of 16): the prompt is computed once, and its
    blocks are held once, while all four samples run; the outputs match a run without sharing."""
    prompt = torch.randint(0, 256, (65,), generator=torch.Generator().manual_seed(9)).tolist()
    params = SamplingParams(temperature=0.8, max_tokens=4, seed=5, n=4, ignore_eos=True)
    core = _core(model)
    core.add_request("r", prompt, params)
    out = core.scheduler.schedule()
    computed = sum(s.num_new_tokens for s in out.scheduled)
    assert computed == 65 + 3 * 1  # the first sample computes all, each sibling only its last token
    core.scheduler.update_from_output(out, {s.request_id: [1] for s in out.scheduled})
    assert core.kv.num_usable_blocks - core.kv.num_free_blocks == 4 + 4  # 4 shared + one tail each
    shared = LLM.from_core(_core(model)).generate([prompt], params)[0]
    alone = LLM.from_core(_core(model, enable_prefix_caching=False)).generate([prompt], params)[0]
    assert [c.token_ids for c in shared.outputs] == [c.token_ids for c in alone.outputs]
