"""The training worker: one Ray Train worker hosts one pipeline stage and one
expert shard (what `moray.parallel` gives its rank), runs the step loop, and
writes metrics, events and checkpoints.

Ray Train starts one of these per rank with torch.distributed initialised;
after any failure it starts them all again, and each resumes from the last
committed checkpoint, so the run goes on as if nothing had happened.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from moray.actors import resume
from moray.actors.chaos import Chaos
from moray.actors.errors import NonRetryableError
from moray.actors.watchdog import StepWatchdog
from moray.platform.checkpoint import CheckpointError, LeaseHeldError, rng_state_json, set_rng_state_json
from moray.platform.config import MorayConfig
from moray.platform.console import Console
from moray.platform.loggers import build_loggers
from moray.platform.runlog import RunDir
from moray.platform.schedule import batch_sequences_at, lr_at


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """Entry point handed to `TorchTrainer`."""
    import ray.train

    _quiet_report_log()
    ctx = ray.train.get_context()
    reported = ray.train.get_checkpoint()
    try:
        worker = TrainingWorker(
            MorayConfig.model_validate(loop_config["config"]),
            rank=ctx.get_world_rank(),
            world_size=ctx.get_world_size(),
            local_rank=ctx.get_local_rank(),
            resume=loop_config.get("resume", "auto"),
            report=RayTrainReporter(ctx.get_storage(), ctx.get_world_rank()),
            submit_id=loop_config.get("submit_id"),
            reported_checkpoint=reported.path if reported is not None else None,
            run_id=loop_config.get("run_id"),
        )
    except SETUP_ERRORS as err:  # the config or the layout: every attempt would fail the same way
        raise NonRetryableError(f"setting up rank {ctx.get_world_rank()} failed: {type(err).__name__}: {err}") from err
    try:
        worker.run()
    except LeaseHeldError as err:  # another run owns the storage now: a restart would meet it again
        raise NonRetryableError(str(err)) from err


def _quiet_report_log() -> None:
    """Ray Train logs every report's whole metrics dict at INFO, once per rank, past
    LoggingConfig (its logger is named by file path); our checkpoint line says it once."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


# A worker's set-up fails with these when the request is wrong (config, layout, weights that do
# not match the model), never because a node or a peer went away.
SETUP_ERRORS = (ValueError, TypeError, KeyError)


class RayTrainReporter:
    """Reports committed checkpoints to Ray Train, so `Result.checkpoint`, `get_checkpoint()` on a
    restart and the Train dashboard show them. Nothing is copied: a checkpoint inside Ray Train's
    experiment directory (the run directory) is reported where it is; one elsewhere (train.storage)
    through a small pointer directory that names it. Every rank calls it (Ray Train's report is a
    barrier); rank 0's checkpoint is the one registered."""

    def __init__(self, storage, rank: int):
        self.storage, self.rank = storage, rank

    def __call__(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None) -> None:
        import ray.train

        checkpoint = None
        if checkpoint_dir is not None and self.rank == 0:
            checkpoint = ray.train.Checkpoint(self._managed(checkpoint_dir), filesystem=self.storage.storage_filesystem)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)

    def _managed(self, checkpoint_dir: str) -> str:
        import posixpath

        exp = self.storage.experiment_fs_path
        if "://" not in checkpoint_dir and Path(checkpoint_dir).resolve().is_relative_to(Path(exp).resolve()):
            return str(Path(checkpoint_dir).resolve())
        pointer = posixpath.join(exp, "checkpoint_refs", posixpath.basename(checkpoint_dir.rstrip("/")))
        fs = self.storage.storage_filesystem
        fs.create_dir(pointer, recursive=True)
        with fs.open_output_stream(posixpath.join(pointer, resume.POINTER)) as f:
            f.write(json.dumps({"path": checkpoint_dir}).encode())
        return pointer


class TrainingWorker:
    def __init__(self, cfg: MorayConfig, rank: int, world_size: int, local_rank: int = 0,
                 resume: str = "auto", report=None, submit_id: Optional[str] = None,
                 reported_checkpoint: Optional[str] = None, run_id: Optional[str] = None):
        from moray.parallel import ParallelDims, TrainEngine
        from moray.platform.checkpoint import CheckpointStore

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        t = cfg.train
        self.rundir = RunDir(t.runs_dir, t.run_name)
        self.report = report  # report(metrics, checkpoint_dir=None), on every rank; None outside Ray Train
        self.resume = resume  # what the submission asked for; a retry decides again (moray.actors.resume)
        self.submit_id = submit_id
        self.reported_checkpoint = reported_checkpoint  # Ray Train's last reported checkpoint, if any
        self.device = torch.device(f"cuda:{local_rank}" if cfg.cluster.use_gpu else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        p = cfg.parallel
        self.dims = ParallelDims.from_config(p, world_size)
        torch.manual_seed(t.seed)
        self.engine = TrainEngine(cfg.model, p, self.dims, rank=rank, device=self.device, seed=t.seed,
                                  lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  grad_clip=t.grad_clip, dtype=t.dtype, eps=t.eps)
        self.dp_rank, self.dp_size = self.dims.dp_rank(rank), self.dims.dp
        self.sampler = self._build_sampler()
        self.chaos = Chaos(t.chaos, self.rundir.path, rank)
        self.store = CheckpointStore(t.storage or self.rundir.checkpoints, keep=t.keep_checkpoints, rank=rank,
                                     world_size=world_size, async_save=t.async_checkpoint, run_id=run_id)
        self.step = 0
        self.tokens_seen = 0
        self.halted = False
        # sys.stdout, not print: Ray Train patches print to also log, which shows each line twice.
        self.console = Console(t.max_steps, log_every=t.log_every)
        self.loggers = None  # opened in run(), once the starting step is known
        self._flops_per_token, self._peak = _flops_and_peak(cfg)

    # ------------------------------------------------------------ set-up

    def _build_sampler(self):
        from moray.data import MixtureSampler

        return MixtureSampler.from_config(self.cfg, dp_rank=self.dp_rank, dp_size=self.dp_size)

    def _event(self, kind: str, **fields: Any) -> None:
        if self.rank == 0 or kind in ("hang", "chaos"):
            self.console.event(self.rundir.event(kind, **{"rank": self.rank, **fields}))

    def _restore(self) -> None:
        decision = resume.agree(
            lambda: resume.decide(self.resume, self.submit_id, self.reported_checkpoint, self.store), self.rank)
        if decision.fresh:
            init = self._init_from() if self.cfg.train.init_from else None
            self._event("start", step=0, world_size=self.world_size, layout=self.dims.describe(), why=decision.why,
                        init_from=init)
            return
        target = None if decision.target == "latest" else decision.target
        started = time.time()
        try:
            res = self.store.load(self.engine.state_dict(), target, adapt=self.engine.state_dict_for)
        except CheckpointError as err:
            if target is None:
                raise  # every candidate failed verification: storage may answer better next time
            raise NonRetryableError(f"{decision.why}: {err}") from err
        self.engine.load_state_dict(res.state)
        extra = res.extra
        self.step, self.tokens_seen = extra["step"], extra["tokens_seen"]
        self.sampler.load_state_dict(extra["sampler"])
        if res.rank_extra is not None:
            set_rng_state_json(res.rank_extra["rng"])
        last_logged = self.rundir.last_logged_step() if self.rank == 0 else None
        lost = max(0, last_logged + 1 - self.step) if last_logged is not None else 0
        for path, reason in res.skipped:
            self._event("checkpoint_skipped", path=str(path), reason=reason)
        self._event("restart", step=self.step, checkpoint=str(res.path), steps_lost=lost,
                    load_seconds=round(time.time() - started, 3), why=decision.why,
                    world_size=self.world_size, layout=self.dims.describe())

    def _init_from(self) -> Dict[str, Any]:
        """train.init_from: a fresh run starts from these weights (each rank reads its own stage)."""
        from moray.platform.init_weights import InitFromError, load_initial_weights

        try:
            return load_initial_weights(self.engine, self.cfg.train.init_from).to_event()
        except InitFromError as err:  # weights that do not fit the model: the same on every attempt
            raise NonRetryableError(str(err)) from err

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        t = self.cfg.train
        watchdog = StepWatchdog(t.hang_timeout_s, self._on_hang).start("startup", t.startup_timeout_s)
        self.watchdog = watchdog
        try:
            self._restore()
            self.loggers = build_loggers(t.loggers if self.rank == 0 else [], self.rundir.path, t.run_name,
                                         self.cfg.to_dict(), start_step=self.step)
            while self.step < t.max_steps:
                if not self._one_step():
                    self.halted = True
                    break  # no final checkpoint of a state that produced NaN
                watchdog.beat(self.step)
                if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                    self._checkpoint(final=self.step == t.max_steps)
            with watchdog.phase("checkpoint", t.checkpoint_timeout_s):
                self._record_commit(self.store.close())  # the last save committed, its writer thread stopped
            if self.rank == 0 and not self.halted:
                self.rundir.event("finish", step=self.step, tokens_seen=self.tokens_seen)
            self.loggers.close("FAILED" if self.halted else "FINISHED")
        finally:
            watchdog.stop()
            if self.loggers is not None:
                self.loggers.close()  # an attempt that failed: a restart goes on in the same logger run

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
        cuda = self.device.type == "cuda"
        est = estimate_memory(self.cfg.model, p, micro_batch_size=local_seqs // p.num_microbatches,
                              seq_len=t.seq_len, dtype=t.dtype, stage=self.dims.pp_rank(self.rank),
                              dp=self.dp_size, microbatches=p.num_microbatches, fused_adamw=cuda)
        # On a GPU the allocator's peak is the whole peak; on the CPU the report counts saved tensors,
        # which miss the transients and the block torch.utils.checkpoint rebuilds in backward
        # (tests/test_memory_agreement.py measures the whole peak there, with TensorMemoryMeter).
        planned = est.total_bytes if cuda else est.held_bytes - est.recompute_bytes
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
            self.loggers.log(rec["step"], rec)
            self.console.step(rec)
        self.last_metrics = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and v is not None}

    # ------------------------------------------------------------ checkpoints

    def _checkpoint(self, final: bool) -> None:
        extra = {"step": self.step, "tokens_seen": self.tokens_seen, "sampler": self.sampler.state_dict(),
                 "layout": self.dims.describe(), "submit_id": self.submit_id}
        self.store.crash_hook = self.chaos.checkpoint_hook(self.step, self._event)
        with self.watchdog.phase("checkpoint", self.cfg.train.checkpoint_timeout_s):
            self.store.save(self.step, self.engine.state_dict(), extra=extra, rank_extra={"rng": rng_state_json()})
            if final or not self.cfg.train.async_checkpoint:
                self._maybe_commit(wait=True)

    def _maybe_commit(self, wait: bool = False) -> None:
        self._record_commit(self.store.wait() if wait else self.store.poll())

    def _record_commit(self, info) -> None:
        """A checkpoint is committed on every rank at once: record it and tell Ray Train."""
        if info is None:
            return
        self._event("checkpoint", step=info.step, path=str(info.path), stall_s=info.stall_s, seconds=info.seconds)
        if self.report is not None:
            self.report(getattr(self, "last_metrics", {}), checkpoint_dir=str(info.path))

    def _on_hang(self, stalled_s: float, step: Optional[int], phase: str) -> None:
        t = self.cfg.train
        limit = {"startup": t.startup_timeout_s, "checkpoint": t.checkpoint_timeout_s}.get(phase, t.hang_timeout_s)
        self.console.event(self.rundir.event("hang", rank=self.rank, step=step, phase=phase,
                                             stalled_s=round(stalled_s, 1), timeout_s=limit))


def _flops_and_peak(cfg: MorayConfig):
    from moray.platform.planner import flops_per_token, peak_flops

    fwd = flops_per_token(cfg.model, cfg.train.seq_len)
    peak = peak_flops(cfg.cluster.gpu, cfg.cluster.peak_flops)
    return 3 * fwd, peak
