"""The training worker: one Ray Train worker hosts one pipeline stage and one
expert shard (what `moray.parallel` gives its rank), runs the step loop, and
writes metrics, events and checkpoints.

Ray Train starts one of these per rank with torch.distributed initialised;
after any failure it starts them all again, and each resumes from the last
committed checkpoint, so the run goes on as if nothing had happened.
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any, Dict, Optional

import numpy as np
import torch

from moray.actors.chaos import Chaos
from moray.actors.watchdog import StepWatchdog
from moray.platform.config import MorayConfig
from moray.platform.runlog import RunDir
from moray.platform.schedule import batch_sequences_at, lr_at


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """Entry point handed to `TorchTrainer`."""
    import ray.train

    ctx = ray.train.get_context()
    worker = TrainingWorker(
        MorayConfig.model_validate(loop_config["config"]),
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        resume=loop_config.get("resume", "auto"),
        report=ray.train.report,
    )
    worker.run()


class TrainingWorker:
    def __init__(self, cfg: MorayConfig, rank: int, world_size: int, local_rank: int = 0,
                 resume: str = "auto", report=None):
        from moray.parallel import ParallelDims, TrainEngine
        from moray.platform.checkpoint import CheckpointStore

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        t = cfg.train
        self.rundir = RunDir(t.runs_dir, t.run_name)
        self.report = report
        self.resume = resume
        self.device = torch.device(f"cuda:{local_rank}" if cfg.cluster.use_gpu else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        p = cfg.parallel
        self.dims = ParallelDims(world_size=world_size, tp=p.tp, pp=p.pp, dp=p.resolved_dp(world_size), ep=p.ep)
        torch.manual_seed(t.seed)
        self.engine = TrainEngine(cfg.model, p, self.dims, rank=rank, device=self.device, seed=t.seed,
                                  lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  grad_clip=t.grad_clip, dtype=t.dtype)
        self.dp_rank, self.dp_size = self.dims.dp_rank(rank), self.dims.dp
        self.sampler = self._build_sampler()
        self.chaos = Chaos(t.chaos, self.rundir.path, rank)
        self.store = CheckpointStore(t.storage or self.rundir.checkpoints, keep=t.keep_checkpoints, rank=rank,
                                     world_size=world_size, async_save=t.async_checkpoint)
        self.step = 0
        self.tokens_seen = 0
        self.halted = False
        self._flops_per_token, self._peak = _flops_and_peak(cfg)

    # ------------------------------------------------------------ set-up

    def _build_sampler(self):
        from moray.data import MixtureSampler

        return MixtureSampler.from_config(self.cfg, dp_rank=self.dp_rank, dp_size=self.dp_size)

    def _event(self, kind: str, **fields: Any) -> None:
        if self.rank == 0 or kind in ("hang", "chaos"):
            self.rundir.event(kind, **{"rank": self.rank, **fields})

    def _restore(self) -> None:
        if self.rundir.is_retry():
            # Ray Train restarted the group after a failure: go on from this run's own latest
            # checkpoint, whatever the first attempt was told.
            self.resume = "auto"
        if self.resume == "never" or (self.resume == "auto" and self.store.latest_step() is None):
            self._event("start", step=0, world_size=self.world_size, layout=self.dims.describe())
            return
        target = None if self.resume == "auto" else self.resume
        started = time.time()
        state = self.engine.state_dict()
        res = self.store.load(state, target)
        self.engine.load_state_dict(state)
        extra = res.extra
        self.step, self.tokens_seen = extra["step"], extra["tokens_seen"]
        self.sampler.load_state_dict(extra["sampler"])
        if res.rank_extra is not None:
            _set_rng_state(res.rank_extra["rng"])
        last_logged = self.rundir.last_logged_step()
        lost = max(0, last_logged + 1 - self.step) if last_logged is not None else 0
        for path, reason in res.skipped:
            self._event("checkpoint_skipped", path=str(path), reason=reason)
        self._event("restart", step=self.step, checkpoint=str(res.path), steps_lost=lost,
                    load_seconds=round(time.time() - started, 3),
                    world_size=self.world_size, layout=self.dims.describe())

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        t = self.cfg.train
        self._restore()
        watchdog = StepWatchdog(t.hang_timeout_s, self._on_hang).start()
        try:
            while self.step < t.max_steps:
                if not self._one_step():
                    self.halted = True
                    break  # no final checkpoint of a state that produced NaN
                watchdog.beat(self.step)
                if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                    self._checkpoint(final=self.step == t.max_steps)
            self._record_commit(self.store.close())  # the last save committed, its writer thread stopped
            if self.rank == 0 and not self.halted:
                self.rundir.event("finish", step=self.step, tokens_seen=self.tokens_seen)
            if self.report is not None:
                # Once, at the end: ray.train.report blocks until Ray Train's controller polls
                # (every ~2 s), so a report per step would triple a small model's step time.
                # Per-step metrics go to metrics.jsonl instead.
                self.report(getattr(self, "last_metrics", {}))
        finally:
            watchdog.stop()

    def _one_step(self) -> bool:
        """One optimizer step; False when the run must halt."""
        t, p = self.cfg.train, self.cfg.parallel
        self.chaos.before_step(self.step, self._event)
        unit = self.dp_size * t.micro_batch_size * p.num_microbatches
        global_seqs = batch_sequences_at(self.tokens_seen, seq_len=t.seq_len, unit=unit,
                                         batch_tokens=t.batch_tokens, batch_tokens_start=t.batch_tokens_start,
                                         batch_ramp_tokens=t.batch_ramp_tokens)
        local = global_seqs // self.dp_size
        tokens = torch.as_tensor(self.sampler.next_batch(local), dtype=torch.long)
        poison = self._poison_embeddings() if self.chaos.poison_loss(self.step) else []
        lr = lr_at(self.step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                   decay_steps=t.lr_decay_steps or t.max_steps)
        self.engine.set_lr(lr)
        start = time.perf_counter()
        # Never apply a non-finite update, whatever on_nan says: the weights stay as they were.
        out = self.engine.step(tokens.to(self.device), skip_nonfinite=True)
        seconds = time.perf_counter() - start
        for handle in poison:
            handle.remove()
        if out.get("skipped") and t.on_nan == "halt":
            self._event("halt", step=self.step, loss=out["loss"], reason="non-finite loss (train.on_nan=halt)")
            return False
        if out.get("skipped") and t.on_nan == "restart":
            self._event("nan", step=self.step, loss=out["loss"], action="restart")
            raise FloatingPointError(f"loss is {out['loss']} at step {self.step} (train.on_nan=restart): "
                                     f"restarting from the last committed checkpoint")
        if out.get("skipped"):
            self._event("step_skipped", step=self.step, loss=out["loss"], reason="non-finite loss or gradient")
        n_tok = global_seqs * t.seq_len
        self.tokens_seen += n_tok
        self._log(out, lr, n_tok, seconds, global_seqs)
        self.step += 1
        self._maybe_commit()
        return True

    def _memory_vs_plan(self, local_seqs: int) -> Dict[str, Any]:
        """This rank's measured peak tensor memory beside the planner's estimate for its stage."""
        from moray.platform.planner import estimate_memory

        p, t = self.cfg.parallel, self.cfg.train
        measured = self.engine.memory_report()
        est = estimate_memory(self.cfg.model, p, micro_batch_size=local_seqs // p.num_microbatches,
                              seq_len=t.seq_len, dtype=t.dtype, stage=self.dims.pp_rank(self.rank),
                              dp=self.dp_size, microbatches=p.num_microbatches)
        # A CPU saved-tensor hook cannot see the block torch.utils.checkpoint rebuilds in backward.
        planned = est.total_bytes - (est.recompute_bytes if self.device.type == "cpu" else 0)
        rec = {**measured, "planned_total": planned, "planned_activations": est.activations_bytes,
               "measured_over_planned": measured["total_peak"] / planned}
        self.rundir.event("memory", rank=self.rank, stage=self.dims.pp_rank(self.rank), **rec)
        return rec

    def _poison_embeddings(self):
        """chaos.nan_at_step: this step's embeddings (hence its loss) become NaN; weights stay intact."""
        return [m.register_forward_hook(lambda mod, inp, out: out * float("nan"))
                for part in self.engine.model_parts for m in part.modules()
                if isinstance(m, torch.nn.Embedding)]

    def _log(self, out: Dict[str, Any], lr: float, n_tok: int, seconds: float, global_seqs: int) -> None:
        tps = n_tok / seconds
        counts = np.asarray(out.get("tokens_per_expert") or [], dtype=np.float64)
        rec = {
            "step": self.step, "time": time.time(), "loss": out["loss"], "aux_loss": out.get("aux_loss"), "z_loss": out.get("z_loss"),
            "grad_norm": out.get("grad_norm"), "lr": lr, "tokens": n_tok, "tokens_seen": self.tokens_seen,
            "batch_sequences": global_seqs, "step_seconds": seconds, "tokens_per_s": tps,
            "mfu": tps * self._flops_per_token / (self._peak * self.world_size),
            "expert_share": (counts / counts.sum()).round(5).tolist() if counts.size and counts.sum() else None,
            "bubble": self.engine.bubble_fraction, "bubble_measured": out.get("bubble_measured"),
            "skipped": bool(out.get("skipped", False)),
        }
        if not hasattr(self, "memory"):  # the first step of each attempt
            self.memory = self._memory_vs_plan(global_seqs // self.dp_size)
            rec["memory"] = self.memory
        if self.rank == 0:
            self.rundir.metrics(rec)
            if self.step % self.cfg.train.log_every == 0:
                # sys.stdout, not print: Ray Train patches print to also log, which shows each line twice.
                sys.stdout.write(f"step {self.step:5d} | loss {rec['loss']:.4f} | aux {rec['aux_loss'] or 0:.3f} | "
                                 f"lr {lr:.2e} | {tps:,.0f} tok/s | mfu {rec['mfu']:.1%}\n")
                sys.stdout.flush()
        self.last_metrics = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and v is not None}

    # ------------------------------------------------------------ checkpoints

    def _checkpoint(self, final: bool) -> None:
        extra = {"step": self.step, "tokens_seen": self.tokens_seen, "sampler": self.sampler.state_dict(),
                 "layout": self.dims.describe()}
        self.store.crash_hook = self.chaos.checkpoint_hook(self.step, self._event)
        self.store.save(self.step, self.engine.state_dict(), extra=extra, rank_extra={"rng": _rng_state()})
        if final or not self.cfg.train.async_checkpoint:
            self._maybe_commit(wait=True)

    def _maybe_commit(self, wait: bool = False) -> None:
        self._record_commit(self.store.wait() if wait else self.store.poll())

    def _record_commit(self, info) -> None:
        if info is not None:
            self._event("checkpoint", step=info.step, path=str(info.path), stall_s=info.stall_s,
                        seconds=info.seconds)

    def _on_hang(self, stalled_s: float, step: Optional[int]) -> None:
        self.rundir.event("hang", rank=self.rank, step=step, stalled_s=round(stalled_s, 1),
                       timeout_s=self.cfg.train.hang_timeout_s)


def _flops_and_peak(cfg: MorayConfig):
    from moray.platform.planner import flops_per_token, peak_flops

    fwd = flops_per_token(cfg.model, cfg.train.seq_len)
    peak = peak_flops(cfg.cluster.gpu, cfg.cluster.peak_flops)
    return 3 * fwd, peak


def _rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
