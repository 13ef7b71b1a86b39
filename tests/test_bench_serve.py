"""bench/serve_engine.py --smoke (without vLLM) runs end to end: greedy outputs equal Hugging Face's
at every batch size, and the JSON carries every row the benchmark reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_agrees_with_hf_and_writes_the_rows(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "serve.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "serve_engine.py"), "--smoke", "--no-vllm", "--no-profile",
                    "--threads", "1", "--out", str(out)], check=True, cwd=ROOT, timeout=120, capture_output=True)
    r = json.loads(out.read_text())
    assert set(r["offline"]) == {"1", "4", "8"}
    for row in r["offline"].values():
        assert row["agreement_vs_hf"]["moray"]["sequences_equal"] == 1.0
        assert row["moray"]["median_tokens_per_s"] > 0 and row["hf"]["median_tokens_per_s"] > 0
    systems = r["poisson"]["systems"]
    assert {"moray_continuous", "moray_static", "hf_static"} <= set(systems)
    for s in systems.values():
        assert s["completed"] == s["requests"] == r["poisson"]["n"]
        assert s["ttft_p50_s"] <= s["ttft_p99_s"]
    assert r["vllm"]["skipped"] == "--no-vllm"
