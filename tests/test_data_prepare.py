"""Preparation: packing, formats, idempotence, the demo corpus, the job on Ray Data."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moray.data import ByteTokenizer, DataConfig, Manifest, SourceConfig, prepare
from moray.data.demo_corpus import build_demo_corpus
from moray.data.sources import _line_ranges, iter_documents, plan_parts
from test_data_helpers import file_states, prepare_corpus, quiet, shard_stream, write_corpus

TOK = ByteTokenizer()


def packed(docs):
    return np.array([t for d in docs for t in TOK.encode(d, eos=True)], dtype=np.int64)


def test_packing_joins_documents_with_eos(tmp_path):
    docs = [f"document number {i} " * (i + 1) for i in range(6)]
    for i, d in enumerate(docs):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / f"{i}.txt").write_text(d)
    data = DataConfig(dir=str(tmp_path / "data"), sources=[SourceConfig(name="t", path=str(tmp_path / "src"))])
    m = prepare(data, 16, log=quiet).manifest
    (shard,) = m.sources[0].shards  # small: one part
    want = packed(docs)
    rows = m.read_shard(0, 0)
    assert rows.shape == (shard.sequences, 17) and rows.dtype == np.uint16
    assert shard.sequences == (len(want) - 1) // 16 and shard.tokens == shard.sequences * 16
    np.testing.assert_array_equal(rows[:, 1:][:-1, -1], rows[1:, 0], "rows overlap by one token")
    stream = shard_stream(m, 0, 0)
    np.testing.assert_array_equal(stream, want[: len(stream)])
    assert len(want) - len(stream) < 16, "only the last partial row is dropped"
    assert shard.documents == 6 and shard.stream_tokens == len(want)


def test_jsonl_parquet_and_globs(tmp_path):
    lines = [json.dumps({"content": f"line {i} " * (i % 7 + 1), "id": i}) for i in range(300)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n\n")
    texts = [f"parquet row {i} " * 3 for i in range(120)]
    pq.write_table(pa.table({"body": texts}), tmp_path / "b.parquet", row_group_size=25)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "x.pyi").write_text("def f() -> int: ...\n" * 5)
    (tmp_path / "code" / "y.py").write_text("ignored = True\n")
    sources = [
        SourceConfig(name="j", path=str(tmp_path / "a.jsonl"), format="jsonl", text_field="content"),
        SourceConfig(name="p", path=str(tmp_path / "b.parquet"), format="parquet", text_field="body", weight=0.5),
        SourceConfig(name="c", path=str(tmp_path / "code"), format="code", glob="*.pyi"),
    ]
    m = prepare(DataConfig(dir=str(tmp_path / "d"), sources=sources, shard_sequences=20), 8, log=quiet).manifest
    j, p, c = m.sources
    assert j.documents == 300 and len(j.shards) > 1, "a JSONL file splits into several shards"
    assert p.documents == 120 and len(p.shards) > 1 and p.weight == 0.5
    assert c.documents == 1
    parts = plan_parts(SourceConfig(name="j", path=str(tmp_path / "a.jsonl"), format="jsonl", text_field="content"), 64 * 8)
    assert [d for part in parts for d in iter_documents(part)] == [json.loads(x)["content"] for x in lines]


def test_line_ranges_split_on_newlines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"".join(b"%d%s\n" % (i, b"x" * (i % 13)) for i in range(500)))
    size = path.stat().st_size
    ranges = _line_ranges(str(path), size, 200)
    assert ranges[0][0] == 0 and ranges[-1][1] == size and len(ranges) > 10
    raw = path.read_bytes()
    for (a, b), (c, _) in zip(ranges, ranges[1:]):
        assert b == c and raw[b - 1 : b] == b"\n"


def test_rerun_writes_nothing(tmp_path):
    first = prepare_corpus(tmp_path)
    before = file_states(tmp_path / "data")
    data = DataConfig(dir=str(tmp_path / "data"), sources=_sources(tmp_path), shard_sequences=8)
    again = prepare(data, 16, log=quiet)
    assert again.written == [] and again.removed == [] and not again.manifest_written
    assert len(again.reused) == sum(len(s.shards) for s in first.sources)
    assert file_states(tmp_path / "data") == before, "same mtimes, same bytes"


def _sources(tmp_path):
    return [SourceConfig(name="text", path=str(tmp_path / "src" / "text"), epochs=2),
            SourceConfig(name="code", path=str(tmp_path / "src" / "code"), format="code", epochs=4)]


def test_changed_input_redoes_only_its_part(tmp_path):
    m = prepare_corpus(tmp_path)
    data = DataConfig(dir=str(tmp_path / "data"), sources=_sources(tmp_path), shard_sequences=8)
    doc = tmp_path / "src" / "code" / "mod005.py"
    doc.write_text(doc.read_text() + "extra = 1\n")
    again = prepare(data, 16, log=quiet)
    assert len(again.written) == 1 and again.written[0].startswith("shards/code/")
    assert len(again.removed) == 1 and again.manifest_written
    assert not (tmp_path / "data" / again.removed[0]).exists()
    assert again.manifest.id != m.id and Manifest.load(str(tmp_path / "data")).id == again.manifest.id


def test_lost_manifest_is_rebuilt_from_the_shards(tmp_path):
    m = prepare_corpus(tmp_path)
    (tmp_path / "data" / "manifest.json").unlink()
    shards = {k: v for k, v in file_states(tmp_path / "data").items()}
    data = DataConfig(dir=str(tmp_path / "data"), sources=_sources(tmp_path), shard_sequences=8)
    again = prepare(data, 16, log=quiet)
    assert again.written == [] and again.manifest.to_json() == m.to_json()
    assert all(file_states(tmp_path / "data")[k] == v for k, v in shards.items())


def test_the_same_tokens_have_the_same_id_anywhere(tmp_path):
    a = prepare_corpus(tmp_path / "a")
    b = prepare_corpus(tmp_path / "b")  # same content, other folders and mtimes
    assert a.id == b.id


def test_demo_corpus_small(tmp_path):
    sources = build_demo_corpus(str(tmp_path / "src"), code_bytes=60_000, docstring_bytes=30_000, log=quiet)
    assert [(s.name, s.format, s.epochs) for s in sources] == [("text", "text", 2), ("code", "code", 4)]
    code = sorted((tmp_path / "src" / "code").rglob("*.py"))
    topics = list((tmp_path / "src" / "text" / "topics").glob("*.txt"))
    docs = list((tmp_path / "src" / "text" / "docstrings").glob("*.txt"))
    assert code and len(topics) > 50 and docs
    code_modules = {p.relative_to(tmp_path / "src" / "code").as_posix()[:-3].replace("/", ".") for p in code}
    assert not code_modules & {p.stem for p in docs}, "docstrings come from modules not in the code subset"
    assert "lambda" in (tmp_path / "src" / "text" / "topics" / "lambda.txt").read_text()
    before = file_states(tmp_path / "src")
    build_demo_corpus(str(tmp_path / "src"), code_bytes=60_000, docstring_bytes=30_000, log=quiet)
    assert file_states(tmp_path / "src") == before, "a rebuild writes nothing"
    m = prepare(DataConfig(dir=str(tmp_path / "data"), sources=sources, shard_sequences=64), 128, log=quiet).manifest
    assert m.sources[1].tokens > 50_000 and m.tokenizer["id"] == "byte-v1"


@pytest.mark.ray
def test_job_on_ray_data_matches_local(tmp_path):
    """jobs/prepare_data.py end to end on a 2-CPU embedded Ray cluster; a rerun writes nothing."""
    import ray
    import yaml

    local = prepare_corpus(tmp_path)  # sources under tmp_path/src, prepared without Ray
    config = {
        "train": {"seq_len": 16},
        "data": {"dir": str(tmp_path / "ray"), "shard_sequences": 8,
                 "sources": [{"name": s.name, "path": s.path, "format": s.format, "epochs": s.epochs}
                             for s in _sources(tmp_path)]},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    job = _job()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert job.main(["--config", str(tmp_path / "cfg.yaml")]) == 0
        on_ray = Manifest.load(str(tmp_path / "ray"))
        assert on_ray.to_json() == local.to_json(), "Ray Data and the plain loop make the same shards"
        before = file_states(tmp_path / "ray")
        assert job.main(["--config", str(tmp_path / "cfg.yaml")]) == 0
        assert file_states(tmp_path / "ray") == before
    finally:
        ray.shutdown()


def test_job_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text("data: {dir: %s, sources: [{name: x, path: %s}]}\n" % (tmp_path, tmp_path / "no"))
    assert _job().main(["--config", str(tmp_path / "cfg.yaml"), "--local"]) == 2
    assert "does not exist" in capsys.readouterr().err


def _job():
    """jobs/prepare_data.py as a module (jobs/ is not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "jobs"))  # as `python jobs/prepare_data.py` has it
    spec = importlib.util.spec_from_file_location("prepare_data_job", os.path.join(root, "jobs", "prepare_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ensure_prepared_keeps_the_prepared_seq_len(tmp_path):
    from moray.data.preparation import ensure_prepared
    from moray.platform.config import load_config

    prepare_corpus(tmp_path)  # at seq_len 16
    srcs = [f"{{name: {s.name}, path: {s.path}, format: {s.format}, epochs: {s.epochs}}}" for s in _sources(tmp_path)]
    overrides = [f"data.dir={tmp_path / 'data'}", "data.shard_sequences=8", f"data.sources=[{', '.join(srcs)}]",
                 "train.seq_len=64"]
    before = file_states(tmp_path / "data")
    m = ensure_prepared(load_config(None, overrides), log=quiet)
    assert m.seq_len == 16 and file_states(tmp_path / "data") == before
