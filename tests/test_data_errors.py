"""Corrupt or missing shards, mismatched tokenizers and states fail with errors that say what to do."""

from __future__ import annotations

import shutil

import pytest

from moray.data import DataConfig, DataError, Manifest, MixtureSampler, SourceConfig, prepare
from moray.data.sources import SourceError
from moray.platform.config import ConfigError, load_config
from test_data_helpers import prepare_corpus, quiet


@pytest.fixture()
def data(tmp_path):
    manifest = prepare_corpus(tmp_path)
    return manifest, tmp_path / "data"


def read_everything(sampler):
    for _ in range(sampler.pass_sequences // 16 + 1):
        sampler.next_batch(16)


def test_corrupt_shard_names_the_file(data):
    manifest, root = data
    shard = root / manifest.sources[1].shards[2].file
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        read_everything(MixtureSampler(str(root), seed=0))
    msg = str(err.value)
    assert str(shard) in msg and "corrupt" in msg and "prepare_data.py" in msg


def test_missing_shard_names_the_file(data):
    manifest, root = data
    shard = root / manifest.sources[0].shards[0].file
    shard.unlink()
    sampler = MixtureSampler(str(root), seed=0)  # opening is lazy: the error comes at the first read
    with pytest.raises(DataError, match="missing") as err:
        read_everything(sampler)
    assert str(shard) in str(err.value) and "'text'" in str(err.value)


def test_swapped_shard_is_caught(data):
    manifest, root = data
    a, b = (root / manifest.sources[0].shards[i].file for i in (0, 1))
    shutil.copyfile(b, a)
    with pytest.raises(DataError, match="corrupt"):
        read_everything(MixtureSampler(str(root), seed=0))


def test_tokenizer_mismatch_names_manifest_and_fix(data):
    _, root = data
    with pytest.raises(DataError) as err:
        MixtureSampler(str(root), seed=0, tokenizer_id="hf-0123456789abcdef")
    msg = str(err.value)
    assert "manifest.json" in msg and "byte-v1" in msg and "data.tokenizer" in msg


def test_vocab_too_small(data):
    _, root = data
    with pytest.raises(DataError, match="model.vocab_size"):
        MixtureSampler(str(root), seed=0, vocab_size=256)


def test_no_manifest(tmp_path):
    with pytest.raises(DataError, match="prepare_data.py"):
        MixtureSampler(str(tmp_path), seed=0)


def test_state_from_other_data_or_seed(data, tmp_path):
    manifest, root = data
    state = MixtureSampler(manifest, seed=0).state_dict()
    with pytest.raises(DataError, match="seed 0 vs 1"):
        MixtureSampler(manifest, seed=1).load_state_dict(state)
    other = prepare_corpus(tmp_path / "other", seed=7)
    with pytest.raises(DataError, match="strict=False"):
        MixtureSampler(other, seed=0).load_state_dict(state)
    lenient = MixtureSampler(other, seed=0)
    lenient.load_state_dict(state, strict=False)
    assert lenient.next_batch(2).shape == (2, 17)


def test_mixture_naming_unknown_source(data):
    manifest, _ = data
    with pytest.raises(DataError, match="re-run prepare_data.py"):
        MixtureSampler(manifest, seed=0, mixture={"web": {"weight": 0.5}})


def test_weights_beside_epochs_must_sum_below_one(data):
    manifest, _ = data
    with pytest.raises(ValueError, match="sum below 1"):
        MixtureSampler(manifest, seed=0, mixture={"text": {"weight": 1.0}})


def test_bad_rank(data):
    manifest, _ = data
    with pytest.raises(ValueError, match="dp_rank 2"):
        MixtureSampler(manifest, seed=0, dp_rank=2, dp_size=2)


def test_seq_len_longer_than_any_shard(data):
    manifest, _ = data
    with pytest.raises(DataError, match="no shard with"):
        MixtureSampler(manifest, seed=0, seq_len=100_000)


def test_source_errors(tmp_path):
    missing = DataConfig(dir=str(tmp_path / "d"), sources=[SourceConfig(name="x", path=str(tmp_path / "nope"))])
    with pytest.raises(SourceError, match="does not exist"):
        prepare(missing, 16, log=quiet)
    (tmp_path / "empty").mkdir()
    empty = DataConfig(dir=str(tmp_path / "d"), sources=[SourceConfig(name="x", path=str(tmp_path / "empty"))])
    with pytest.raises(SourceError, match="no files matching"):
        prepare(empty, 16, log=quiet)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    bad = DataConfig(dir=str(tmp_path / "d"), sources=[SourceConfig(name="j", path=str(tmp_path / "bad.jsonl"), format="jsonl")])
    with pytest.raises(SourceError, match=r"bad.jsonl at byte 17: not valid JSON"):
        prepare(bad, 2, log=quiet)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("hi")
    tiny = DataConfig(dir=str(tmp_path / "d"), sources=[SourceConfig(name="t", path=str(tmp_path / "tiny"))])
    with pytest.raises(DataError, match="no sequence of 17 tokens"):
        prepare(tiny, 16, log=quiet)


def test_config_rejects_bad_sources():
    with pytest.raises(ConfigError, match="either epochs or weight"):
        load_config(None, ["data.sources=[{name: a, path: x, epochs: 2, weight: 0.5}]"])
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(None, ["data.sources=[{name: a, path: x}, {name: a, path: y}]"])
    with pytest.raises(ConfigError, match="data.sources.0.epoch"):
        load_config(None, ["data.sources=[{name: a, path: x, epoch: 2}]"])


def test_manifest_roundtrip(data):
    manifest, root = data
    again = Manifest.load(str(root))
    assert again.to_json() == manifest.to_json() and again.id == manifest.id


def test_verify_rebuilds_a_corrupt_shard(data, tmp_path):
    manifest, root = data
    shard = root / manifest.sources[0].shards[3].file
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    cfg = DataConfig(dir=str(root), sources=[
        SourceConfig(name="text", path=str(tmp_path / "src" / "text"), epochs=2),
        SourceConfig(name="code", path=str(tmp_path / "src" / "code"), format="code", epochs=4)], shard_sequences=8)
    assert prepare(cfg, 16, log=quiet).written == [], "without --verify, name and size are trusted"
    again = prepare(cfg, 16, verify=True, log=quiet)
    assert again.written == [manifest.sources[0].shards[3].file] and again.manifest.to_json() == manifest.to_json()
    read_everything(MixtureSampler(str(root), seed=0))


def test_no_ray_pydantic_or_tokenizers_at_import():
    import subprocess
    import sys

    code = ("import sys, moray.data, moray.data.sampler, moray.data.preparation; "
            "print(sorted(m for m in ('ray', 'pydantic', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
