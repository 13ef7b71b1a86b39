import importlib.util
import io

import pytest

from moray.platform import loggers
from moray.platform.config import ConfigError
from moray.platform.loggers import MetricLoggers, build_loggers, check_loggers, logger_env, scalars

CONFIG = {"train": {"lr": 0.003, "max_steps": 5, "betas": [0.9, 0.95]}, "model": {"n_layers": 2}}


def _rec(step, loss):
    """A record shaped like the ones TrainingWorker._log writes to metrics.jsonl."""
    rec = {"step": step, "time": 1_700_000_000.0 + step, "loss": loss, "aux_loss": 1.0 + step / 100,
           "z_loss": None, "lr": 3e-3 * (step + 1) / 5, "tokens": 512, "tokens_seen": 512 * (step + 1),
           "tokens_per_s": 1000.0 + step, "mfu": 0.01, "expert_share": [0.25 + step / 100, 0.75 - step / 100],
           "skipped": step == 3}
    if step == 0:
        rec["memory"] = {"total_peak": 1e6, "planned_total": 2e6}
    return rec


def _read_tensorboard(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_are_the_numeric_fields_by_their_metrics_jsonl_names():
    s = scalars(_rec(0, 4.5))
    assert s["loss"] == 4.5 and s["tokens_seen"] == 512.0 and s["skipped"] == 0.0
    assert s["expert_share/0"] == 0.25 and s["expert_share/1"] == 0.75
    assert s["memory/total_peak"] == 1e6
    # the axes are not metrics, and a missing value (z_loss None) is not a zero
    assert not {"step", "time", "z_loss"} & set(s)


def test_tensorboard_reads_back_what_was_logged(tmp_path):
    recs = [_rec(step, 5.0 - step * 0.25) for step in range(5)]
    logs = build_loggers(["tensorboard"], tmp_path, "t", CONFIG)
    for rec in recs:
        logs.log(rec["step"], rec)
    logs.close("FINISHED")

    got = _read_tensorboard(tmp_path / "tensorboard")
    expected = {}
    for rec in recs:
        for key, value in scalars(rec).items():
            expected.setdefault(key, []).append((rec["step"], value, rec["time"]))
    assert set(got) == set(expected)
    for tag, points in expected.items():
        assert [p[0] for p in got[tag]] == [p[0] for p in points], tag
        # TensorBoard stores float32, hence rel=1e-6; wall time is the step's own time
        assert [p[1] for p in got[tag]] == pytest.approx([p[1] for p in points], rel=1e-6), tag
        assert [p[2] for p in got[tag]] == pytest.approx([p[2] for p in points]), tag
    assert [v for _, v, _ in got["loss"]] == pytest.approx([5.0, 4.75, 4.5, 4.25, 4.0])


def test_tensorboard_after_a_restart_shows_the_redone_steps(tmp_path):
    first = build_loggers(["tensorboard"], tmp_path, "t", CONFIG)
    for step in range(5):
        first.log(step, _rec(step, float(step)))
    first.close()  # the attempt died after step 4; the checkpoint holds 3 steps
    second = build_loggers(["tensorboard"], tmp_path, "t", CONFIG, start_step=3)
    for step in range(3, 6):
        second.log(step, _rec(step, 10.0 + step))
    second.close()
    loss = [(s, v) for s, v, _ in _read_tensorboard(tmp_path / "tensorboard")["loss"]]
    assert loss == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]


def test_unknown_logger_is_an_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"unknown logger 'wandb'; choose from \['mlflow', 'tensorboard'\]"):
        check_loggers(["tensorboard", "wandb"])


@pytest.mark.parametrize("name,install", [("tensorboard", "pip install 'moray[tensorboard]'"),
                                          ("mlflow", "pip install mlflow")])
def test_missing_package_says_what_to_pip_install(monkeypatch, name, install):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec",
                        lambda mod, *a: None if mod == name else find_spec(mod, *a))
    with pytest.raises(ConfigError) as err:
        check_loggers([name])
    assert f"the {name} package is not installed: {install}" in str(err.value)
    with pytest.raises(ConfigError):  # the workers check too, before writing anything
        build_loggers([name], "unused", "t", CONFIG)


def test_no_loggers_log_nothing(tmp_path):
    logs = build_loggers([], tmp_path, "t", CONFIG)  # what ranks other than 0 build
    logs.log(0, _rec(0, 1.0))
    logs.close("FINISHED")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_logger_is_switched_off_with_one_warning():
    class Broken:
        name = "broken"

        def log(self, step, values, walltime):
            raise ConnectionError("tracking server went away")

    warnings = io.StringIO()
    logs = MetricLoggers([Broken()], stream=warnings)
    logs.log(0, _rec(0, 1.0))
    logs.log(1, _rec(1, 1.0))
    assert warnings.getvalue().count("warning: logger broken failed at step 0") == 1
    assert "metrics.jsonl has every step" in warnings.getvalue()


def test_logger_env_forwards_mlflow_settings_only_for_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert logger_env(["tensorboard"]) == {}
    assert logger_env(["mlflow"])["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_mlflow_logs_metrics_params_and_resumes_its_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is optional and large (scipy, scikit-learn, SQLAlchemy...); "
                                         "not in the test extra")
    pytest.importorskip("sqlalchemy", reason="the default MLflow store (SQLite in the run dir) needs SQLAlchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs = build_loggers(["mlflow"], tmp_path, "t", CONFIG)
    for step in range(3):
        logs.log(step, _rec(step, 5.0 - step))
    logs.close()  # an attempt ended: the MLflow run stays open for the restart
    again = build_loggers(["mlflow"], tmp_path, "t", CONFIG, start_step=3)
    again.log(3, _rec(3, 2.0))
    again.close("FINISHED")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run((tmp_path / "mlflow_run_id").read_text())
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.n_layers"] == "2"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == [(0, 5.0), (1, 4.0), (2, 3.0), (3, 2.0)]
    share = client.get_metric_history(run.info.run_id, "expert_share/1")
    assert sorted(m.value for m in share) == pytest.approx([0.72, 0.73, 0.74, 0.75])
