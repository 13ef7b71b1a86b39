"""bench/serve_spec.py --smoke runs end to end: it trains a tiny target and draft (into a temporary
cache), measures plain, draft-model and n-gram speculative decoding, and writes every field the
benchmark reports; greedy speculative output equals plain greedy in every configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_the_fields_and_greedy_equality_holds(tmp_path):
    out = tmp_path / "spec.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "serve_spec.py"), "--smoke", "--threads", "1",
                    "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
                   check=True, cwd=ROOT, timeout=180, capture_output=True)
    r = json.loads(out.read_text())
    assert r["preset"] == "smoke" and r["dtype"] == "float32"
    assert r["greedy_equal_all"] is True and r["errors"] == []
    assert r["training"]["steps"] > 0 and not r["training"]["cached"] and r["target"]["held_out_loss"] > 0
    assert r["drafts"] and all(d["params_total"] < r["target"]["params_total"] for d in r["drafts"].values())
    assert list((tmp_path / "cache").glob("*.pt"))  # the trained weights were cached
    seen = {(s["batch"], s["temperature"]) for s in r["sweeps"]}
    assert seen == {(b, t) for b in r["batches"] for t in r["temperatures"]}
    for s in [*r["sweeps"], r["repetitive"]]:
        plain = s["rows"][0]
        assert plain["method"] == "plain" and plain["speedup"] == 1.0
        for row in s["rows"]:
            assert row["output_tokens"] == s["prompts"] * s["new_tokens"]
            assert row["tokens_per_s"] > 0 and row["speedup"] > 0
            d = row["decode"]
            assert d["steps"] > 0 and d["step_ms"] >= d["target_ms"] > 0
            if row["method"] == "draft":
                assert row["spec"]["drafted"] > 0 and 0 <= row["spec"]["acceptance_rate"] <= 1
                assert d["draft_ms"] > 0 and d["draft_forwards_per_step"] >= 1
            if s["temperature"] == 0:
                assert row["greedy_equal"] is True
    assert {row["method"] for row in r["repetitive"]["rows"]} == {"plain", "draft", "ngram"}
    assert set(r["forward_ms_by_tokens"]) == {"target", *r["drafts"]}
    assert r["forward_ms_by_tokens"]["target"]["1"]["experts_per_layer"] == r["target"]["config"]["top_k"]
    for b in r["breakdown"]:
        for row in b["rows"]:
            assert abs(row["share_draft"] + row["share_verify"] + row["share_other"] - 1) < 1e-6
            assert row["ideal_speedup"] == row["tokens_per_step_per_seq"] >= 1
