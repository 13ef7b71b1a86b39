"""Prepare data: sources -> tokenized, packed parquet shards + manifest.json.

`prepare(data_cfg, seq_len, map_fn=...)` plans parts (a few MB of input each),
skips the parts whose shard is already on disk, hands the rest to `map_fn`
(a plain loop by default, Ray Data in `jobs/prepare_data.py`), writes the
manifest only when it changed and removes shards no part asks for. A rerun
over unchanged inputs therefore writes nothing.

Packing: a part's documents are tokenized and joined with EOS after each one;
the stream is cut into rows of seq_len + 1 tokens that overlap by one token
(row i = stream[i*L : i*L + L + 1]). The last < L tokens of a part are dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from moray.data import storage
from moray.data.config import DataConfig, SourceConfig
from moray.data.manifest import DataError, Manifest, ShardInfo, SourceInfo, decode_shard, encode_shard
from moray.data.sources import iter_documents, plan_parts
from moray.data.tokenizer import ByteTokenizer, load_tokenizer, token_dtype

PACK_VERSION = 1  # bump when packing changes: every shard's fingerprint changes with it
MapFn = Callable[[Callable[[Dict], Dict], List[Dict]], List[Dict]]


@dataclass
class PrepareResult:
    manifest: Manifest
    written: List[str] = field(default_factory=list)  # shard files made by this run
    reused: List[str] = field(default_factory=list)  # shard files already there
    removed: List[str] = field(default_factory=list)  # stale shard files deleted
    manifest_written: bool = False


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers may run elsewhere); URIs unchanged."""
    return path if "://" in path else os.path.abspath(path)


def local_map(fn: Callable[[Dict], Dict], tasks: List[Dict], log: Callable[[str], None] = print) -> List[Dict]:
    out = []
    for i, task in enumerate(tasks):
        out.append(fn(task))
        log(f"  [{i + 1}/{len(tasks)}] {out[-1]['file']}: {out[-1]['sequences']} sequences")
    return out


def prepare(
    data: DataConfig,
    seq_len: int,
    *,
    map_fn: Optional[MapFn] = None,
    verify: bool = False,
    log: Callable[[str], None] = print,
) -> PrepareResult:
    """Make `data.dir` hold shards for every source in `data.sources` at `seq_len`.

    verify: re-hash shards that are already there instead of trusting name and size.
    """
    if not data.sources:
        raise DataError("data.sources is empty: list sources in the config or set data.demo_corpus: true")
    tok = load_tokenizer(data.tokenizer)
    data_dir = absolute(data.dir)
    old = _load_old(data_dir, log)
    bytes_per_token = 1 if isinstance(tok, ByteTokenizer) else 4  # a guess for subword tokenizers
    target = data.shard_sequences * seq_len * bytes_per_token
    dtype = token_dtype(tok.vocab_size).name
    tok_spec = data.tokenizer if isinstance(tok, ByteTokenizer) else absolute(data.tokenizer)

    plans: List[tuple] = []  # (source, [task, ...])
    for src in data.sources:
        src_abs = replace(src, path=absolute(src.path))
        tasks = []
        for part in plan_parts(src_abs, target):
            fp = fingerprint(part, tok.id, seq_len)
            rel = f"shards/{src.name}/{src.name}-{part['index']:05d}-{fp[:12]}.parquet"
            tasks.append({"part": part, "tokenizer": tok_spec, "tokenizer_id": tok.id, "seq_len": seq_len,
                          "dtype": dtype, "eos_id": tok.eos_id, "data_dir": data_dir, "file": rel, "fingerprint": fp})
        plans.append((src, tasks))

    result = PrepareResult(manifest=None)  # type: ignore[arg-type]
    records: Dict[str, Dict] = {}
    todo: List[Dict] = []
    listed = {sh.file: sh for src in (old.sources if old else []) for sh in src.shards}
    on_disk = {f"shards/{e.rel}": e for e in storage.list_files(storage.join(data_dir, "shards"))}
    for _, tasks in plans:
        for task in tasks:
            rec = _existing(task, on_disk.get(task["file"]), listed.get(task["file"]), verify)
            if rec is None:
                todo.append(task)
            else:
                records[task["file"]] = rec
                result.reused.append(task["file"])
    log(f"prepare: {len(todo)} shard(s) to write, {len(result.reused)} already prepared, in {data.dir}")
    if todo:
        mapped = (map_fn or functools.partial(local_map, log=log))(process_part, todo)
        for rec in mapped:
            records[rec["file"]] = rec
            result.written.append(rec["file"])

    sources = []
    for src, tasks in plans:
        shards = [ShardInfo(**records[t["file"]]) for t in tasks]
        info = SourceInfo(src.name, src.format, src.path, src.epochs, src.weight, shards)
        if info.sequences == 0:
            raise DataError(
                f"data source {src.name!r} has no sequence of {seq_len + 1} tokens "
                f"({sum(records[t['file']]['stream_tokens'] for t in tasks)} tokens in all); "
                "add documents or lower train.seq_len"
            )
        sources.append(info)
    tokenizer = {"id": tok.id, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    result.manifest = Manifest(dir=data.dir, seq_len=seq_len, tokenizer=tokenizer, dtype=dtype, sources=sources)
    result.removed = _prune(data_dir, {t["file"] for _, tasks in plans for t in tasks})
    result.manifest_written = result.manifest.save()
    return result


def configured_data(cfg, log: Callable[[str], None] = print) -> DataConfig:
    """cfg.data, with the demo corpus's sources (written under data.dir/sources if needed)
    in front when data.demo_corpus is set; checks the tokenizer fits model.vocab_size."""
    data = cfg.data
    tok = load_tokenizer(data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"tokenizer {tok.id} has {tok.vocab_size} ids but model.vocab_size is {cfg.model.vocab_size}; "
            f"raise model.vocab_size to at least {tok.vocab_size}"
        )
    if not data.demo_corpus:
        return data
    from moray.data.demo_corpus import build_demo_corpus

    demo = build_demo_corpus(storage.join(data.dir, "sources"), log=log)
    clash = sorted({s.name for s in demo} & {s.name for s in data.sources})
    if clash:
        raise DataError(f"data.sources uses the demo corpus's name(s) {clash}; rename them")
    return replace(data, sources=demo + list(data.sources))


def ensure_prepared(cfg, *, map_fn: Optional[MapFn] = None, log: Callable[[str], None] = print) -> Manifest:
    """What a training job runs first: prepare what is missing or changed, in this process
    unless map_fn says otherwise (a no-op costs one stat per shard). Data already prepared
    keeps its seq_len (the sampler re-chunks to train.seq_len), so a context-extension run
    does not rewrite the shards that a pre-training checkpoint's sampler state names."""
    data = configured_data(cfg, log)
    if not data.sources:  # prepared elsewhere: use what is there
        return Manifest.load(data.dir)
    try:
        seq_len = Manifest.load(data.dir).seq_len
    except DataError:
        seq_len = cfg.train.seq_len
    return prepare(data, seq_len, map_fn=map_fn, log=log).manifest


def fingerprint(part: Dict, tokenizer_id: str, seq_len: int) -> str:
    """What a shard's content depends on: the part's inputs (not where the folder sits), tokenizer, seq_len."""
    key = {k: part[k] for k in ("source", "format", "text_field", "items")}
    key.update(tokenizer=tokenizer_id, seq_len=seq_len, pack=PACK_VERSION)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str):
    return load_tokenizer(spec)


def process_part(task: Dict) -> Dict:
    """Tokenize, pack and write one shard; returns its manifest record. Runs in a Ray task."""
    tok = _tokenizer(task["tokenizer"])
    if tok.id != task["tokenizer_id"]:
        raise DataError(f"tokenizer {task['tokenizer']} changed while preparing ({tok.id} != {task['tokenizer_id']})")
    L = task["seq_len"]
    eos = np.array([task["eos_id"]], dtype=np.int32)
    pieces, documents = [], 0
    for doc in iter_documents(task["part"]):
        pieces += [tok.encode_array(doc), eos]
        documents += 1
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    n = max(len(stream) - 1, 0) // L
    rows = stream[np.arange(n)[:, None] * L + np.arange(L + 1)].astype(task["dtype"])  # (n, L+1)
    meta = {"format": "moray-shards-v1", "tokenizer": task["tokenizer_id"], "seq_len": L, "source": task["part"]["source"],
            "fingerprint": task["fingerprint"], "documents": documents, "stream_tokens": len(stream)}
    raw = encode_shard(rows.reshape(n, L + 1), meta)
    storage.write_atomic(storage.join(task["data_dir"], task["file"]), raw)
    return {"file": task["file"], "sequences": n, "tokens": n * L, "documents": documents,
            "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw), "fingerprint": task["fingerprint"],
            "stream_tokens": int(len(stream)), "tokens_sha256": hashlib.sha256(rows.tobytes()).hexdigest()}


def _load_old(data_dir: str, log) -> Optional[Manifest]:
    try:
        return Manifest.load(data_dir)
    except DataError as err:
        if storage.stat(storage.join(data_dir, "manifest.json")) is not None:
            log(f"prepare: ignoring the old manifest ({err})")
        return None


def _existing(task: Dict, entry: Optional[storage.FileEntry], listed: Optional[ShardInfo], verify: bool) -> Optional[Dict]:
    """The record of this task's shard if it is already on disk (entry) and sound, else None.
    listed: its entry in the old manifest, if any."""
    if entry is None:
        return None
    path = storage.join(task["data_dir"], task["file"])
    if listed is not None and listed.bytes == entry.size and not verify:
        return dict(listed.__dict__)
    # Not listed (a run that died before its manifest) or asked to verify: read it.
    raw = storage.read_bytes(path)
    try:
        rows, meta = decode_shard(raw, path)
    except DataError:
        return None
    digest = hashlib.sha256(raw).hexdigest()
    if meta.get("fingerprint") != task["fingerprint"] or (listed and listed.sha256 != digest):
        return None
    n, L = rows.shape[0], task["seq_len"]
    return {"file": task["file"], "sequences": n, "tokens": n * L, "documents": int(meta.get("documents", 0)),
            "sha256": digest, "bytes": len(raw), "fingerprint": task["fingerprint"],
            "stream_tokens": int(meta.get("stream_tokens", 0)), "tokens_sha256": hashlib.sha256(rows.tobytes()).hexdigest()}


def _prune(data_dir: str, keep: Sequence[str]) -> List[str]:
    """Delete shard files (and temporaries) under data_dir/shards that no part asks for."""
    removed = []
    for entry in storage.list_files(storage.join(data_dir, "shards")):
        rel = f"shards/{entry.rel}"
        if rel not in keep and (rel.endswith(".parquet") or ".parquet.tmp-" in rel):
            storage.delete(storage.join(data_dir, rel))
            removed.append(rel)
    return removed
