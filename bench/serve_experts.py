"""Distinct experts each MoE layer touches per decode step: the engine measured against the planner.

The planner (moray/platform/planner/inference.py `experts_touched`) prices a
decode step's expert weight reads by the experts its b tokens route to. This
runs an EngineCore with b sequences all decoding (steady state: every prompt
prefilled, each step exactly b tokens), averages `stats.last_experts_touched`
over layers and decode steps, and compares it with the planner at b = 1, 16, 64:

- uniform: E (1 - (1 - k/E)^b), the planner's default (exact in expectation
  for tokens routed uniformly and independently);
- shares: sum_e (1 - (1 - k p_e)^b) per layer, p_e the share of assignments
  each expert received over the same decode steps (the planner's
  `expert_shares` input), which is what non-uniform but independent routing gives.

Models: configs/tiny.yaml's shape at 8 experts top-2 and at 32 experts top-2,
each random-initialised and trained a few hundred steps on the demo corpus
(plain torch, AdamW, batch 8 x 64 tokens, the model's own load-balancing and
z losses).

    python bench/serve_experts.py [--steps 300] [--decode-steps 32] [--quick]

Prints a table and writes bench/results/serve_experts.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moray.model import ModelConfig, build_model  # noqa: E402
from moray.model.paged import moe_step_stats  # noqa: E402
from moray.platform.planner.inference import experts_touched  # noqa: E402
from moray.serve.engine.config import EngineConfig  # noqa: E402
from moray.serve.engine.core import EngineCore  # noqa: E402
from moray.serve.engine.sampling import SamplingParams  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "serve_experts.json"
BATCHES = (1, 16, 64)
PROMPT_LEN = 32


def tiny_moe(n_experts: int, top_k: int = 2, **overrides) -> ModelConfig:
    """configs/tiny.yaml's model with n_experts experts (read without pydantic)."""
    from model_common import read_simple_yaml

    m = read_simple_yaml((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    return ModelConfig(**{**m, "n_experts": n_experts, "top_k": top_k, **overrides})


def measure(model, cfg: ModelConfig, prompts: Sequence[Sequence[int]], decode_steps: int,
            temperature: float = 1.0) -> Dict:
    """Experts touched per MoE layer per decode step with len(prompts) sequences all decoding.

    Returns the mean over layers and steps, per-layer means, and per-layer assignment
    shares (each expert's share of the layer's b * k assignments, over those steps)."""
    b = len(prompts)
    longest = max(len(p) for p in prompts)
    blocks = b * (-(-(longest + decode_steps + 2) // 16)) + 2
    core = EngineCore(model, cfg, EngineConfig(max_num_seqs=b, max_batch_tokens=b * longest + b,
                                               kv_block_size=16, kv_cache_blocks=blocks,
                                               enable_prefix_caching=False))
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", list(p), SamplingParams(temperature=temperature, seed=1000 + i,
                                                          max_tokens=decode_steps + 2, ignore_eos=True))
    touched: List[List[int]] = []
    counts: Optional[torch.Tensor] = None
    while core.has_unfinished_requests():
        core.step()
        stats = moe_step_stats(core.executor.model)
        tokens = int(stats.expert_tokens[0].sum()) // cfg.top_k  # tokens this step ran
        if tokens != b or core.stats.num_requests_running != b:
            continue  # a prefill step, or a step after some sequence finished
        assert stats.experts_touched == core.stats.last_experts_touched
        touched.append(list(core.stats.last_experts_touched))
        counts = stats.expert_tokens.double() if counts is None else counts + stats.expert_tokens.double()
    if not touched:
        raise RuntimeError(f"no steady decode step at batch {b}: every step mixed prefill or fewer sequences")
    per_layer = torch.tensor(touched, dtype=torch.float64).mean(0)  # (layers,)
    shares = counts / counts.sum(-1, keepdim=True)  # (layers, E)
    return {"batch": b, "decode_steps": len(touched), "measured": float(per_layer.mean()),
            "measured_per_layer": per_layer.tolist(), "shares": shares.tolist()}


def planned_from_shares(shares: Sequence[Sequence[float]], top_k: int, b: int) -> float:
    """sum_e (1 - (1 - k p_e)^b), averaged over layers: independent tokens, expert shares p_e."""
    per_layer = [sum(1 - (1 - min(1.0, top_k * p)) ** b for p in layer) for layer in shares]
    return sum(per_layer) / len(per_layer)


def random_prompts(cfg: ModelConfig, n: int, length: int = PROMPT_LEN, seed: int = 0) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(256, cfg.vocab_size), (n, length), generator=g).tolist()


def corpus_batches(seq_len: int, seed: int = 1234):
    """(sampler, data dir): the demo corpus prepared as configs/tiny.yaml prepares it."""
    from moray.data import MixtureSampler
    from moray.data.preparation import ensure_prepared
    from moray.platform.config import load_config

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"data.dir={ROOT / 'data' / 'demo'}",
                                                            f"train.seq_len={seq_len}"])
    ensure_prepared(cfg, log=lambda *_: None)
    return MixtureSampler.from_config(cfg)


def train(cfg: ModelConfig, steps: int, sampler, batch: int = 8, lr: float = 3e-3, seed: int = 0):
    """A few hundred AdamW steps of next-token loss (+ the MoE layers' own aux losses)."""
    model = build_model(cfg, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for step in range(steps):
        x = torch.as_tensor(sampler.next_batch(batch))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses


def corpus_prompts(sampler, n: int) -> List[List[int]]:
    """n prompts of real text: the first PROMPT_LEN tokens of unseen sequences."""
    return [row[:PROMPT_LEN].tolist() for row in sampler.next_batch(n)]


def run_model(name: str, model, cfg: ModelConfig, prompts: List[List[int]], decode_steps: int,
              batches=BATCHES) -> List[Dict]:
    rows = []
    for b in batches:
        m = measure(model, cfg, prompts[:b], decode_steps if b > 1 else max(8, decode_steps // 4))
        uniform = experts_touched(cfg, b)
        from_shares = planned_from_shares(m["shares"], cfg.top_k, b)
        rows.append({"model": name, "n_experts": cfg.n_experts, "top_k": cfg.top_k, **m,
                     "planned_uniform": uniform, "ratio_uniform": m["measured"] / uniform,
                     "planned_shares": from_shares, "ratio_shares": m["measured"] / from_shares})
        print(row_line(rows[-1]), flush=True)  # as it goes: the table again at the end
    return rows


def row_line(r: Dict) -> str:
    return (f"{r['model']:<16}{r['batch']:>4}{r['decode_steps']:>7}{r['measured']:>10.2f}"
            f"{r['planned_uniform']:>9.2f}{r['ratio_uniform']:>7.3f}{r['planned_shares']:>8.2f}"
            f"{r['ratio_shares']:>7.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps per trained model")
    ap.add_argument("--decode-steps", type=int, default=32, help="steady decode steps averaged per batch size")
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seq-len", type=int, default=64, help="training sequence length (batch 8)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    sampler = corpus_batches(args.seq_len)
    rows, training = [], {}
    for E in args.experts:
        cfg = tiny_moe(E)
        random_model = build_model(cfg, seed=7).eval()
        rows += run_model(f"random-{E}x{cfg.top_k}", random_model, cfg, random_prompts(cfg, max(BATCHES)),
                          args.decode_steps)
        t0 = time.perf_counter()
        trained, losses = train(cfg, args.steps, sampler)
        training[f"trained-{E}x{cfg.top_k}"] = {"steps": args.steps, "batch": 8, "seq_len": args.seq_len,
                                                "seconds": time.perf_counter() - t0, "loss_first": losses[0],
                                                "loss_last10": sum(losses[-10:]) / 10}
        rows += run_model(f"trained-{E}x{cfg.top_k}", trained, cfg, corpus_prompts(sampler, max(BATCHES)),
                          args.decode_steps)

    print(f"{'model':<16}{'b':>4}{'steps':>7}{'measured':>10}{'uniform':>9}{'ratio':>7}"
          f"{'shares':>8}{'ratio':>7}")
    for r in rows:
        print(row_line(r))
    for name, t in training.items():
        print(f"{name}: {t['steps']} steps in {t['seconds']:.0f} s, loss {t['loss_first']:.2f} -> "
              f"{t['loss_last10']:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "what": "distinct experts per MoE layer per steady decode step (mean over layers and steps) "
                "against the planner: uniform E(1-(1-k/E)^b) and from measured shares sum_e(1-(1-k p_e)^b)",
        "prompt_tokens": PROMPT_LEN, "temperature": 1.0, "training": training, "rows": rows,
        "host": platform.node(), "torch": torch.__version__, "threads": args.threads,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
