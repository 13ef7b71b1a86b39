"""Metric loggers: the per-step metrics of metrics.jsonl, also sent to the
tools people already watch runs in (`train.loggers: [tensorboard, mlflow]`).

metrics.jsonl stays the record; a logger is a copy of it. So a logger that
fails mid-run is switched off with one warning instead of stopping training,
while a logger that cannot start (unknown name, package missing) is an error
raised by `check_loggers` on the driver before any worker starts.

Only rank 0 logs: other ranks call `build_loggers([], ...)`, which logs nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from moray.platform.config import ConfigError

# name -> (modules it imports, what to pip install when one is missing)
_REQUIRES: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "pip install 'moray[tensorboard]'"),
    "mlflow": (("mlflow",), "pip install mlflow"),
}


def check_loggers(names: Sequence[str]) -> None:
    """Raise ConfigError naming what is wrong with train.loggers and what to install."""
    for name in names:
        if name not in _REQUIRES:
            raise ConfigError(f"train.loggers: unknown logger {name!r}; choose from {sorted(_REQUIRES)}")
        modules, install = _REQUIRES[name]
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            # The default store is an SQLite file in the run dir: full mlflow has sqlalchemy,
            # mlflow-skinny does not.
            modules = modules + ("sqlalchemy",)
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"train.loggers has {name!r} but the {missing[0]} package is not installed: "
                              f"{install} (or remove {name!r} from train.loggers)")


def logger_env(names: Sequence[str]) -> Dict[str, str]:
    """The driver's environment that the workers' loggers need (Ray does not pass it on by itself)."""
    if "mlflow" not in names:
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}


def scalars(rec: Dict[str, Any]) -> Dict[str, float]:
    """A metrics.jsonl record as named scalars: numbers under their own key, lists and dicts of
    numbers under key/index (expert_share/0, memory/total_peak); step and time are the axes."""
    return dict(_flatten(rec, skip=("step", "time")))


def _flatten(value: Any, prefix: str = "", skip: Sequence[str] = ()) -> Iterator[Tuple[str, float]]:
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, v in items:
        name = f"{prefix}{key}"
        if name in skip or v is None or isinstance(v, str):
            continue
        if isinstance(v, (dict, list, tuple)):
            yield from _flatten(v, name + "/")
        elif isinstance(v, (bool, int, float)):
            yield name, float(v)


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: Dict[str, Any], start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a restart redoes the steps after its checkpoint, and TensorBoard then
        # shows the redone values instead of two lines over the same steps.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None, flush_secs=10)
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), global_step=start_step)

    def log(self, step: int, values: Dict[str, float], walltime: Optional[float]) -> None:
        for key, v in values.items():
            self.writer.add_scalar(key, v, global_step=step, walltime=walltime)

    def close(self, status: Optional[str]) -> None:
        self.writer.close()


class _MLflow:
    """One MLflow run per moray run: restarts and resumed jobs go on logging into it."""

    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, config: Dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        # Kept in the run dir, so `--resume never` (which archives the run dir) starts a new run.
        id_file = run_dir / "mlflow_run_id"
        self.run_id = id_file.read_text().strip() if id_file.exists() else None
        if self.run_id is not None:
            try:
                self.client.get_run(self.run_id)
                return
            except MlflowException:  # another tracking server than last time: start over there
                self.run_id = None
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "moray")
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        run = self.client.create_run(exp_id, run_name=run_name, tags={"moray.run_dir": str(run_dir)})
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id)
        params = [Param(k, str(v)[:6000]) for k, v in _params(config)]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: Dict[str, float], walltime: Optional[float]) -> None:
        from mlflow.entities import Metric

        ms = int((walltime or 0) * 1000)
        metrics = [Metric(k, v, ms, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, status: Optional[str]) -> None:
        if status is not None:
            self.client.set_terminated(self.run_id, status=status)


def _params(config: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for k, v in config.items():
        if isinstance(v, dict):
            yield from _params(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


class MetricLoggers:
    """The loggers of one run on rank 0; empty (a no-op) elsewhere."""

    def __init__(self, backends: List[Any], stream=None):
        self.backends = backends
        self.stream = stream if stream is not None else sys.stderr

    def log(self, step: int, rec: Dict[str, Any]) -> None:
        """Log one metrics.jsonl record (the same dict RunDir.metrics writes)."""
        if not self.backends:
            return
        values, walltime = scalars(rec), rec.get("time")
        for backend in list(self.backends):
            try:
                backend.log(step, values, walltime)
            except Exception as err:  # noqa: BLE001 - a copy of metrics.jsonl must not stop training
                self.backends.remove(backend)
                self.stream.write(f"warning: logger {backend.name} failed at step {step} and is off for this "
                                  f"attempt ({type(err).__name__}: {err}); metrics.jsonl has every step\n")

    def close(self, status: Optional[str] = None) -> None:
        """status: "FINISHED" or "FAILED" ends the MLflow run; None (the attempt stopped and
        Ray Train may restart it) leaves it running."""
        for backend in self.backends:
            backend.close(status)
        self.backends = []


def build_loggers(names: Sequence[str], run_dir: Path, run_name: str, config: Dict[str, Any],
                  start_step: int = 0) -> MetricLoggers:
    """Open the named loggers for a run (on rank 0; pass [] elsewhere). start_step: the step this
    attempt starts from (after a restart, the checkpoint's), so redone steps replace the old ones."""
    check_loggers(names)
    run_dir = Path(run_dir)
    backends: List[Any] = []
    for name in dict.fromkeys(names):  # once each, in the order given
        if name == "tensorboard":
            backends.append(_TensorBoard(run_dir, config, start_step))
        else:
            backends.append(_MLflow(run_dir, run_name, config))
    return MetricLoggers(backends)
