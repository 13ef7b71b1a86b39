"""The controller: turns a config into a run and sees it through.

It validates the layout before any worker starts, starts a Ray Train
`TorchTrainer` whose workers each host one pipeline stage and one expert
shard (`moray.actors.train_worker`), records failures as they happen, lets
Ray Train restart the whole group from the last committed checkpoint up to
`train.max_failures` times, and writes loss.png at the end.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from moray.platform.config import ConfigError, MorayConfig
from moray.platform.runlog import RunDir, plot_loss


class RunFailed(RuntimeError):
    """The run stopped for good; the message names the last good checkpoint and how to resume."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: List[Dict[str, Any]]
    events: List[Dict[str, Any]]
    loss_png: Optional[Path]

    @property
    def final_loss(self) -> Optional[float]:
        return self.metrics[-1]["loss"] if self.metrics else None


def validate_layout(cfg: MorayConfig) -> int:
    """The world size, after checking the layout against the model; raises ConfigError saying what fits."""
    from moray.parallel import ParallelDims

    world = cfg.world_size()
    p = cfg.parallel
    try:
        dp = p.resolved_dp(world)
        ParallelDims(world_size=world, tp=p.tp, pp=p.pp, dp=dp, ep=p.ep).validate(cfg.model)
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
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        from moray.actors.train_worker import train_loop_per_worker
        from moray.platform.failures import FailureEvents

        self._check_resources()
        c, t = self.cfg.cluster, self.cfg.train
        if resume == "never":
            archived = self.run.archive()
            if archived is not None:
                print(f"--resume never: the previous run's files are kept in {archived}")
            store = self._store()
            if store.latest_step() is not None:
                raise ConfigError(
                    f"--resume never, but {store.root} already holds checkpoints of an earlier run; "
                    f"point train.storage somewhere new, or resume with --resume auto")
        (self.run.path / "config.yaml").write_text(self.cfg.to_yaml())
        submitted = self.run.event("submit", world_size=self.world_size, resume=resume, layout=self.cfg.parallel.to_dict())
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": self.cfg.to_dict(), "resume": resume},
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
                name=t.run_name,
                storage_path=str(self.run.path / "ray_train"),
                failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                callbacks=[FailureEvents(str(self.run.path))],
                worker_runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}},
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our own line per step is enough
            ),
        )
        try:
            trainer.fit()
        except Exception as err:  # Ray Train gave up: max_failures exceeded or a fatal error
            self.run.event("gave_up", error=_short(err))
            raise RunFailed(self._give_up_message(err)) from None
        halts = [e for e in self.run.read_events() if e["event"] == "halt"]
        if halts and halts[-1]["time"] > submitted["time"]:
            raise RunFailed(self._give_up_message(RuntimeError(halts[-1]["reason"] + f" at step {halts[-1]['step']}"),
                                                  restarts=False))
        metrics = self.run.read_metrics()
        png = plot_loss(metrics, self.run.path / "loss.png", title=f"{t.run_name}: training loss")
        return RunResult(self.run.path, metrics, self.run.read_events(), png)

    def _store(self):
        """A read-only view of the run's checkpoints from the driver (no process group)."""
        from moray.platform.checkpoint import CheckpointStore

        return CheckpointStore(self.cfg.train.storage or self.run.checkpoints, keep=self.cfg.train.keep_checkpoints,
                               rank=0, world_size=1, async_save=False)

    def _give_up_message(self, err: BaseException, restarts: bool = True) -> str:
        store = self._store()
        step = store.latest_step()
        where = f"the last good checkpoint is step {step} in {store.root}" if step is not None else \
            "no checkpoint was committed"
        why = f"stopped after {self.cfg.train.max_failures} restarts" if restarts else "halted"
        return (f"run {self.cfg.train.run_name!r} {why}: "
                f"{_short(err)}\n{where}; events: {self.run.events_path}\n"
                f"resume with: python jobs/pretrain.py --config {self.run.path / 'config.yaml'} --resume auto")


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
