"""The controller: turns a config into a run and sees it through.

It validates the layout before any worker starts, starts a Ray Train
`TorchTrainer` whose workers each host one pipeline stage and one expert
shard (`moray.actors.train_worker`), records failures as they happen, lets
Ray Train restart the whole group from the last committed checkpoint up to
`train.max_failures` times, and writes loss.png at the end.
"""

from __future__ import annotations

import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from moray.platform.config import ConfigError, MorayConfig
from moray.platform.console import event_line, run_summary
from moray.platform.loggers import check_loggers, logger_env
from moray.platform.runlog import RunDir, plot_loss


class RunFailed(RuntimeError):
    """The run stopped for good; the message names the last good checkpoint and how to resume."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: List[Dict[str, Any]]
    events: List[Dict[str, Any]]
    loss_png: Optional[Path]
    checkpoint: Optional[str] = None  # the last checkpoint Ray Train registered (Result.checkpoint)

    @property
    def final_loss(self) -> Optional[float]:
        return self.metrics[-1]["loss"] if self.metrics else None


def validate_layout(cfg: MorayConfig) -> int:
    """The world size, after checking the layout against the model; raises ConfigError saying what fits."""
    from moray.parallel import ParallelDims

    world = cfg.world_size()
    p = cfg.parallel
    try:
        ParallelDims.from_config(p, world).validate(cfg.model, sequence_parallel=p.sequence_parallel and p.tp > 1)
    except ValueError as err:
        raise ConfigError(f"bad layout: {err}") from None
    # Ray Train numbers workers node by node, and tp is the innermost mesh dimension, so
    # each tensor-parallel group lands on one node when tp divides the GPUs of a node.
    if cfg.cluster.use_gpu and cfg.cluster.gpus_per_node % p.tp:
        raise ConfigError(
            f"bad layout: parallel.tp={p.tp} does not divide cluster.gpus_per_node={cfg.cluster.gpus_per_node}; "
            f"a tensor-parallel group must stay inside one node (NVLink): use tp in "
            f"{[d for d in range(1, cfg.cluster.gpus_per_node + 1) if cfg.cluster.gpus_per_node % d == 0]}"
        )
    return world


def with_absolute_paths(cfg: MorayConfig) -> MorayConfig:
    """Workers run in Ray's own directories: hand them absolute paths, not the driver's relative ones."""
    cfg = cfg.model_copy(deep=True)
    cfg.data.dir = str(Path(cfg.data.dir).expanduser().resolve()) if "://" not in cfg.data.dir else cfg.data.dir
    cfg.train.runs_dir = str(Path(cfg.train.runs_dir).expanduser().resolve())
    if cfg.train.storage and "://" not in cfg.train.storage:
        cfg.train.storage = str(Path(cfg.train.storage).expanduser().resolve())
    return cfg


class Controller:
    def __init__(self, cfg: MorayConfig):
        self.cfg = cfg = with_absolute_paths(cfg)
        self.world_size = validate_layout(cfg)
        check_loggers(cfg.train.loggers)
        if cfg.train.init_from:  # pinned to the step `latest` names now, so every attempt starts from the same weights
            from moray.platform.init_weights import check_init_from

            try:
                cfg.train.init_from = check_init_from(cfg.train.init_from, cfg.model).path
            except ValueError as err:
                raise ConfigError(str(err)) from None
        self.run = RunDir(cfg.train.runs_dir, cfg.train.run_name)

    def _check_resources(self) -> None:
        import ray

        c = self.cfg.cluster
        have_cpu = ray.cluster_resources().get("CPU", 0)
        need_cpu = self.world_size * c.cpus_per_worker
        if need_cpu > have_cpu:
            raise ConfigError(
                f"the layout needs {self.world_size} workers x {c.cpus_per_worker} CPU = {need_cpu} CPUs but the "
                f"Ray cluster has {have_cpu:g}; lower cluster.cpus_per_worker or use a smaller layout"
            )
        if c.use_gpu and ray.cluster_resources().get("GPU", 0) < self.world_size:
            raise ConfigError(
                f"the layout needs {self.world_size} GPUs but the Ray cluster has "
                f"{ray.cluster_resources().get('GPU', 0):g}; add GPU nodes or shrink the layout"
            )

    def fit(self, resume: str = "auto") -> RunResult:
        self._check_resources()
        t = self.cfg.train
        if resume == "never":
            self._take_lease(self.run.run_id()).release()  # never archive a run that is writing right now
            self._start_over()
        self._check_resume_target(resume)
        (self.run.path / "config.yaml").write_text(self.cfg.to_yaml())
        submit_id = uuid.uuid4().hex[:12]  # one per fit(): a retry inside it keeps it, a new submission does not
        run_id = self.run.run_id()
        lease = self._take_lease(run_id)
        try:
            submitted = self.run.event("submit", world_size=self.world_size, resume=resume, submit_id=submit_id,
                                       layout=self.cfg.parallel.to_dict())
            _say(event_line("submit", submitted))
            try:
                result = self._trainer(resume, submit_id, run_id).fit()
            except Exception as err:  # Ray Train gave up: max_failures exceeded, or a failure not worth retrying
                self.run.event("gave_up", error=_short(err))
                self._summary()
                fatal = [e for e in self.run.read_events() if e["event"] == "fatal" and e.get("submit_id") == submit_id]
                if fatal:
                    raise RunFailed(self._give_up_message(RuntimeError(fatal[-1]["error"]), restarts=False,
                                                          why="stopped without retrying (it would fail the same "
                                                              "way on every attempt)")) from None
                raise RunFailed(self._give_up_message(err)) from None
        finally:
            lease.release()
        halts = [e for e in self.run.read_events() if e["event"] == "halt"]
        if halts and halts[-1]["time"] > submitted["time"]:
            self._summary()
            raise RunFailed(self._give_up_message(RuntimeError(halts[-1]["reason"] + f" at step {halts[-1]['step']}"),
                                                  restarts=False))
        metrics = self.run.read_metrics()
        png = plot_loss(metrics, self.run.path / "loss.png", title=f"{t.run_name}: training loss")
        self._summary(metrics, png)
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
        return RunResult(self.run.path, metrics, self.run.read_events(), png, checkpoint)

    def _trainer(self, resume: str, submit_id: str, run_id: str):
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        from moray.actors.train_worker import train_loop_per_worker
        from moray.platform.failures import FailureEvents

        c, t = self.cfg.cluster, self.cfg.train
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": self.cfg.to_dict(), "resume": resume, "submit_id": submit_id,
                               "run_id": run_id},
            torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo",
                                     timeout_s=int(max(60, t.hang_timeout_s * 2))),
            scaling_config=ray.train.ScalingConfig(
                num_workers=self.world_size, use_gpu=c.use_gpu,
                resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})},
                # PACK keeps neighbouring ranks (a tensor-parallel group is the innermost
                # mesh dimension, so consecutive ranks) on the same node.
                placement_strategy="PACK",
            ),
            run_config=ray.train.RunConfig(
                # Ray Train's experiment directory is the run directory itself, so the checkpoints
                # under it are reported to Ray Train where they lie, without a copy.
                name=self.run.path.name,
                storage_path=str(self.run.path.parent),
                failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                callbacks=[FailureEvents(str(self.run.path), submit_id)],
                worker_runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", **logger_env(t.loggers)}},
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our own line per step is enough
            ),
        )

    def _start_over(self) -> None:
        """--resume never: the previous run's files move aside, and its checkpoints must not be in the way."""
        archived = self.run.archive()
        if archived is not None:
            print(f"--resume never: the previous run's files are kept in {archived}")
        if self._store().latest_step() is not None:
            raise ConfigError(f"--resume never, but {self._store().root} already holds checkpoints of an earlier "
                              f"run; point train.storage somewhere new, or resume with --resume auto")

    def _summary(self, metrics=None, png=None) -> None:
        metrics = self.run.read_metrics() if metrics is None else metrics
        _say(run_summary(metrics, self.run.read_events(), self.run.path, png, max_steps=self.cfg.train.max_steps))

    def _take_lease(self, run_id: str):
        """One run at a time writes to a checkpoint storage: a second is refused, naming the first.
        The driver renews the lease for as long as the run lasts (a thread); the workers' stores
        check it before each commit."""
        from moray.platform.checkpoint import LeaseHeldError, StorageLease

        root = self.cfg.train.storage or self.run.checkpoints
        lease = StorageLease(root, run_id, run_name=self.cfg.train.run_name,
                             break_hint=f"`rm {root.rstrip('/')}/lease.json`")
        try:
            lease.acquire()
        except LeaseHeldError as err:
            raise ConfigError(str(err)) from None
        lease.start_heartbeat()
        return lease

    def _check_resume_target(self, resume: str) -> None:
        """An explicit --resume PATH|STEP must name a committed checkpoint before any worker starts."""
        if resume in ("auto", "never"):
            return
        from moray.platform.checkpoint import CheckpointError
        from moray.platform.checkpoint import manifest as mf

        store = self._store()
        problems = []
        try:  # the manifest only: the workers checksum the files as they load them
            mf.read_manifest(store._locate(int(resume) if resume.isdigit() else resume))
        except (CheckpointError, mf.ManifestError, OSError, ValueError) as err:
            problems = [str(err)]
        if problems:
            steps = [e.step for e in store.list_checkpoints() if e.committed]
            raise ConfigError(f"--resume {resume}: not a loadable checkpoint ({'; '.join(problems)[:500]}); "
                              f"committed steps under {store.root}: {steps or 'none'}; "
                              f"use one of them, a checkpoint path, auto or never")

    def _store(self):
        """A read-only view of the run's checkpoints from the driver (no process group)."""
        from moray.platform.checkpoint import CheckpointStore

        return CheckpointStore(self.cfg.train.storage or self.run.checkpoints, keep=self.cfg.train.keep_checkpoints,
                               rank=0, world_size=1, async_save=False)

    def _give_up_message(self, err: BaseException, restarts: bool = True, why: Optional[str] = None) -> str:
        store = self._store()
        step = store.latest_step()
        where = f"the last good checkpoint is step {step} in {store.root}" if step is not None else \
            "no checkpoint was committed"
        why = why or (f"stopped after {self.cfg.train.max_failures} restarts" if restarts else "halted")
        return (f"run {self.cfg.train.run_name!r} {why}: "
                f"{_short(err)}\n{where}; events: {self.run.events_path}\n"
                f"resume with: python jobs/pretrain.py --config {self.run.path / 'config.yaml'} --resume auto")


def _say(line: Optional[str]) -> None:
    if line:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _short(err: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(err), err)).strip()
    return text[-2000:]


def run_pretraining(cfg: MorayConfig, resume: str = "auto") -> RunResult:
    """Validate, prepare the data if needed, connect (or start an embedded cluster) and run;
    what jobs/pretrain.py calls."""
    from moray.data.preparation import ensure_prepared
    from moray.platform.cluster import connect

    controller = Controller(cfg)  # a bad layout fails here, before anything else happens
    ensure_prepared(controller.cfg)  # idempotent: nothing is written when the shards are there
    connect(cfg.cluster.address, min_cpus=controller.world_size * cfg.cluster.cpus_per_worker)
    return controller.fit(resume)
