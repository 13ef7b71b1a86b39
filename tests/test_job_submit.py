"""`ray job submit -- python jobs/pretrain.py` against a head started by `ray start`
with token authentication on (Ray 2.60's default), as a user would do it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    # The venv's bin first on PATH, so the job's `python` is the one with moray installed.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "PATH": path}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    # Ray 2.60: `ray start` turns token authentication on when a token exists; make one first.
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    subprocess.run([RAY, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_pretrain_job_succeeds_under_ray_job_submit(ray_head, tmp_path):
    env, address = ray_head
    assert (Path(env["HOME"]) / ".ray" / "auth_token").exists()
    runs = tmp_path / "runs"
    data = tmp_path / "data"
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           "python", "jobs/pretrain.py", "--config", "configs/tiny.yaml",
           "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2", "--set", "train.run_name=submitted",
           "--set", f"train.runs_dir={runs}", "--set", f"data.dir={data}",
           "--set", "parallel.pp=1", "--set", "parallel.ep=1", "--set", "cluster.num_workers=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    metrics = [json.loads(line) for line in (runs / "submitted" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert (runs / "submitted" / "checkpoints" / "latest").exists()


def test_client_without_token_is_refused(ray_head):
    env, address = ray_head
    env = {**env, "HOME": "/nonexistent-home"}  # no token file to present
    proc = subprocess.run([RAY, "job", "list", "--address", address], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
