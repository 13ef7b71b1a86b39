"""Data and training for bench/serve_spec.py: the stdlib's code as bytes, and a trained
Mixtral-style target with its small drafts (one loop, plain torch, cached under bench/.cache).
Split out so the benchmark file holds the measuring only."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_common import ROOT  # noqa: E402  (puts the repo on sys.path)

from moray.data.demo_corpus import _stdlib_files  # noqa: E402
from moray.model import ModelConfig, build_model, count_params  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "serve_spec"
CACHE_VERSION = 1  # bump when the training recipe changes in a way the key does not see


# ---------------------------------------------------------------- data


def load_code(train_bytes: int, max_file_bytes: int = 100_000) -> Tuple[torch.Tensor, List[bytes], dict]:
    """(training tokens (N,) uint8 -> long later, held-out files, a key of what shaped them).

    The standard library's .py files in the demo corpus's order (a hash of each path): files
    are taken for training until train_bytes, the next ones are held out for prompts."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files(stdlib, max_file_bytes)
    train, held, taken = [], [], 0
    for rel, path in files:
        data = path.read_bytes()
        if taken < train_bytes:
            train.append(data)
            taken += len(data)
        elif len(held) < 200:
            held.append(data)
    blob = b"\n".join(train)
    key = {"python": sys.version.split()[0], "stdlib": str(stdlib), "train_files": len(train),
           "train_bytes": len(blob), "sha": hashlib.blake2b(blob, digest_size=8).hexdigest()}
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8), held, key


def _line_start(data: bytes, at: int) -> int:
    nl = data.find(b"\n", at)
    return at if nl < 0 else nl + 1


def code_prompts(held: Sequence[bytes], n: int, length: int, need: int) -> List[List[int]]:
    """n prompts of `length` byte tokens, each from its own held-out file, starting at a line
    start a third of the way in (past the imports), from files long enough for `need` bytes."""
    out = []
    for data in held:
        if len(data) < 3 * need:
            continue
        s = _line_start(data, len(data) // 3)
        chunk = data[s:s + length]
        if len(chunk) == length and max(chunk) < 128:  # ASCII: a byte is a character
            out.append(list(chunk))
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} held-out files give a {length}-byte prompt; lower --num-prompts")


def repetitive_prompts(held: Sequence[bytes], n: int, length: int) -> List[List[int]]:
    """n prompts that repeat a piece of code (whole lines, about length / 3 bytes) three
    times: the workload where prompt-lookup (n-gram) drafting pays."""
    out = []
    for data in held[::-1]:  # other files than code_prompts takes first
        for frac in (2, 3, 4):
            s = _line_start(data, len(data) // frac)
            piece = data[s:s + length // 3]
            cut = piece.rfind(b"\n")
            if cut >= length // 6 and max(piece[:cut + 1]) < 128 and piece[:cut + 1].strip():
                out.append(list((piece[:cut + 1] * 3)[:length]))
                break
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} repetitive prompts could be made; lower --num-prompts")


# ---------------------------------------------------------------- training


def _cache_key(cfgs: Dict[str, ModelConfig], train: dict, seed: int, data_key: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "models": {n: c.to_dict() for n, c in cfgs.items()}, "train": train,
                       "seed": seed, "data": data_key, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def _windows(data: torch.Tensor, batch: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=g)
    return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long()


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor) -> float:
    model.eval()
    losses = []
    for w in windows.split(4):
        logits = model(w[:, :-1])
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1)))
    return float(torch.stack(losses).mean())


def _optimizer(model, lr: float, weight_decay: float):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def _lr(step: int, steps: int, warm: int, peak: float, floor: float) -> float:
    if step <= warm:
        return peak * step / warm
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train_models(target_cfg: ModelConfig, draft_cfgs: Dict[str, ModelConfig], tr: dict, data: torch.Tensor,
                 held_windows: torch.Tensor, seed: int, data_key: dict, retrain: bool, log: Callable[[str], None],
                 cache_dir: Path):
    """The target and its drafts, trained together on the same batches (or read from the cache).

    The target learns the data (cross-entropy). Each draft learns the data and, more and more as
    training goes on, the target itself: its loss is (1 - w) * CE(data) + w * CE(target's
    probabilities, draft), w rising linearly from 0 to tr["distill"] over the steps (online
    distillation: the target's logits of the step are there already, so teaching costs no extra
    forward). Matching the target's distribution is what the acceptance rule rewards (a draft's
    acceptance is 1 - the total variation between the two, Leviathan et al. 2023).
    Returns (target, {name: draft}, record), every model float32 in eval mode."""
    cfgs = {"target": target_cfg, **draft_cfgs}
    key = _cache_key(cfgs, tr, seed, data_key)
    path = cache_dir / f"models-{key}.pt"
    if path.exists() and not retrain:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        models = {}
        for i, (n, c) in enumerate(cfgs.items()):
            models[n] = build_model(c, seed=seed + i)
            models[n].load_state_dict(blob["state_dicts"][n])
            models[n].eval()
        rec = blob["record"]
        log(f"models: loaded from {path} (trained in {rec['seconds']:.0f} s; held-out loss "
            + ", ".join(f"{n} {r['held_out_loss']:.3f}" for n, r in rec["models"].items()) + ")")
        return models["target"], {n: models[n] for n in draft_cfgs}, {**rec, "cached": True}
    torch.manual_seed(seed)
    models = {n: build_model(c, seed=seed + i, dtype=torch.float32).train() for i, (n, c) in enumerate(cfgs.items())}
    opts = {n: _optimizer(m, tr["lr"] if n == "target" else tr["draft_lr"], tr["weight_decay"])
            for n, m in models.items()}
    g = torch.Generator().manual_seed(seed + 12345)
    steps = tr["steps"]
    curve, t0 = [], time.perf_counter()
    window: Dict[str, List[float]] = {n: [] for n in models}
    seconds = {n: 0.0 for n in models}
    for step in range(1, steps + 1):
        x = _windows(data, tr["batch_size"], tr["seq_len"], g)
        inp, tgt = x[:, :-1], x[:, 1:].reshape(-1)
        w = tr["distill"] * step / steps
        teacher = None
        for n, m in models.items():
            ts = time.perf_counter()
            peak, floor = (tr["lr"], tr["min_lr"]) if n == "target" else (tr["draft_lr"], tr["draft_lr"] / 10)
            for group in opts[n].param_groups:
                group["lr"] = _lr(step, steps, tr["warmup"], peak, floor)
            logits = m(inp).reshape(-1, cfgs[n].vocab_size)
            ce = F.cross_entropy(logits, tgt)
            if n == "target":
                teacher = logits.detach().softmax(-1)
                loss = ce
            else:
                loss = (1 - w) * ce + w * F.cross_entropy(logits, teacher)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opts[n].step()
            opts[n].zero_grad(set_to_none=True)
            window[n].append(ce.item())
            seconds[n] += time.perf_counter() - ts
        if step % tr["log_every"] == 0 or step == steps:
            means = {n: sum(v) / len(v) for n, v in window.items()}
            curve.append({"step": step, "loss": means, "distill_weight": w, "seconds": time.perf_counter() - t0})
            log(f"  step {step}/{steps}: data loss " + ", ".join(f"{n} {v:.3f}" for n, v in means.items())
                + f" (distill weight {w:.2f}, {time.perf_counter() - t0:.0f} s)")
            window = {n: [] for n in models}
    total = time.perf_counter() - t0
    rec_models = {}
    for n, m in models.items():
        c = count_params(cfgs[n])
        rec_models[n] = {"held_out_loss": eval_loss(m, held_windows), "train_seconds": seconds[n],
                         "params_total": c.total, "params_active": c.active, "final_train_loss": curve[-1]["loss"][n]}
    record = {"steps": steps, "seconds": total, "tokens": steps * tr["batch_size"] * tr["seq_len"],
              "models": rec_models, "curve": curve}
    log(f"trained {steps} steps in {total:.0f} s; held-out loss (nats/byte) "
        + ", ".join(f"{n} {r['held_out_loss']:.3f}" for n, r in rec_models.items()))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dicts": {n: m.state_dict() for n, m in models.items()},
                "configs": {n: c.to_dict() for n, c in cfgs.items()}, "record": record}, tmp)
    os.replace(tmp, path)
    for m in models.values():
        m.eval()
    return models["target"], {n: models[n] for n in draft_cfgs}, {**record, "cached": False}


# ---------------------------------------------------------------- timing the engine
