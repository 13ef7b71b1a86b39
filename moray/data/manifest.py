"""Shards and the manifest that lists them.

A shard is a parquet file with one column, `tokens`: fixed-size lists of
seq_len + 1 token ids. Row i of a shard holds tokens [i*L, i*L + L + 1) of the
shard's packed stream (documents joined by EOS), so consecutive rows overlap by
one token and every row is a whole training example: input = row[:-1],
target = row[1:]. The file's key-value metadata repeats the tokenizer id,
seq_len, source and fingerprint, so a shard can be checked on its own.

`manifest.json` under data.dir lists each source's shards with their rows,
tokens and sha256; `read_shard` verifies the checksum and metadata every time it
opens a shard.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moray.data import storage

MANIFEST = "manifest.json"
FORMAT = "moray-shards-v1"
PREPARE_HINT = "python jobs/prepare_data.py --config <your config>"


class DataError(RuntimeError):
    """Prepared data is missing, corrupt or does not match; the message says what to do."""


@dataclass
class ShardInfo:
    file: str  # relative to data.dir
    sequences: int  # rows of seq_len + 1 tokens
    tokens: int  # target tokens: sequences * seq_len (each stored token but the first is a target once)
    documents: int  # documents packed into it
    sha256: str  # of the whole file (checked when the shard is opened)
    bytes: int
    fingerprint: str  # of the part (inputs, tokenizer, seq_len) the shard was made from
    stream_tokens: int = 0  # tokens of the part's packed stream, before its last < seq_len were dropped
    tokens_sha256: str = ""  # of the token rows alone: the same tokens give the same data id anywhere


@dataclass
class SourceInfo:
    name: str
    format: str
    path: str
    epochs: Optional[float]
    weight: Optional[float]
    shards: List[ShardInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.shards = [ShardInfo(**s) if isinstance(s, dict) else s for s in self.shards]
        self.epochs = None if self.epochs is None else float(self.epochs)  # 2 and 2.0 write the same manifest
        self.weight = None if self.weight is None else float(self.weight)

    @property
    def sequences(self) -> int:
        return sum(s.sequences for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)


@dataclass
class Manifest:
    dir: str  # where it was loaded from; not stored in the file
    seq_len: int
    tokenizer: Dict  # id, vocab_size, bos_id, eos_id, pad_id
    dtype: str  # numpy dtype of the stored ids
    sources: List[SourceInfo]
    format: str = FORMAT

    def __post_init__(self) -> None:
        self.sources = [SourceInfo(**s) if isinstance(s, dict) else s for s in self.sources]

    @property
    def path(self) -> str:
        return storage.join(self.dir, MANIFEST)

    @property
    def id(self) -> str:
        """Names the data by its tokens: the same sources prepared anywhere get the same id."""
        shards = [[s.name, [h.tokens_sha256 for h in s.shards]] for s in self.sources]
        key = [self.format, self.seq_len, self.tokenizer["id"], shards]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        body = asdict(self)
        body.pop("dir")
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    def save(self) -> bool:
        """Write manifest.json unless it already holds exactly this; True when written."""
        return storage.write_if_changed(self.path, self.to_json().encode())

    @classmethod
    def load(cls, data_dir: str) -> "Manifest":
        path = storage.join(data_dir, MANIFEST)
        if storage.stat(path) is None:
            raise DataError(f"no prepared data at {data_dir} ({MANIFEST} missing); run {PREPARE_HINT}")
        try:
            body = json.loads(storage.read_bytes(path))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON ({err}); delete it and run {PREPARE_HINT}") from None
        if body.get("format") != FORMAT:
            raise DataError(f"{path}: format {body.get('format')!r}, expected {FORMAT!r}; run {PREPARE_HINT}")
        return cls(dir=data_dir, **body)

    def source(self, name: str) -> SourceInfo:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"{self.path} has no source {name!r} (sources: {', '.join(s.name for s in self.sources)})")

    def check_tokenizer(self, tokenizer_id: str) -> None:
        if tokenizer_id != self.tokenizer["id"]:
            raise DataError(
                f"{self.path} was prepared with tokenizer {self.tokenizer['id']!r} but this run uses "
                f"{tokenizer_id!r}; set data.tokenizer to the one the data was made with, or re-run "
                f"{PREPARE_HINT} with the new data.tokenizer (it writes new shards)"
            )

    def check_vocab(self, vocab_size: int) -> None:
        if self.tokenizer["vocab_size"] > vocab_size:
            raise DataError(
                f"{self.path}: tokenizer {self.tokenizer['id']!r} has {self.tokenizer['vocab_size']} ids but "
                f"model.vocab_size is {vocab_size}; raise model.vocab_size to at least {self.tokenizer['vocab_size']}"
            )

    def read_shard(self, source: int, shard: int) -> np.ndarray:
        """Rows [sequences, seq_len + 1] of one shard, after checking it is the file the manifest lists."""
        info = self.sources[source].shards[shard]
        path = storage.join(self.dir, info.file)
        fix = f"run {PREPARE_HINT} --verify to rebuild it"
        if storage.stat(path) is None:
            raise DataError(f"shard {path} (source {self.sources[source].name!r}, listed in {self.path}) is missing; {fix}")
        raw = storage.read_bytes(path)
        digest = hashlib.sha256(raw).hexdigest()
        if digest != info.sha256:
            raise DataError(
                f"shard {path} is corrupt: sha256 {digest[:12]}... but {self.path} lists {info.sha256[:12]}...; {fix}"
            )
        rows, meta = decode_shard(raw, path)
        if meta.get("tokenizer") != self.tokenizer["id"] or int(meta.get("seq_len", -1)) != self.seq_len:
            raise DataError(
                f"shard {path} was made with tokenizer {meta.get('tokenizer')!r}, seq_len {meta.get('seq_len')} but "
                f"{self.path} says {self.tokenizer['id']!r}, seq_len {self.seq_len}; {fix}"
            )
        if rows.shape[0] != info.sequences:
            raise DataError(f"shard {path} has {rows.shape[0]} rows, {self.path} lists {info.sequences}; {fix}")
        return rows


def encode_shard(rows: np.ndarray, meta: Dict[str, str]) -> bytes:
    """Parquet bytes for rows [n, seq_len + 1] of token ids (stored in rows.dtype)."""
    width = rows.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), width)
    table = pa.table({"tokens": column})
    table = table.replace_schema_metadata({f"moray.{k}": str(v) for k, v in meta.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=max(len(rows), 1))
    return buf.getvalue()


def decode_shard(raw: bytes, path: str) -> tuple[np.ndarray, Dict[str, str]]:
    try:
        table = pq.read_table(pa.BufferReader(raw))
        column = table.column("tokens").combine_chunks()
        width = column.type.list_size
        rows = column.values.to_numpy(zero_copy_only=False).reshape(-1, width)
    except (pa.ArrowException, KeyError, AttributeError, ValueError) as err:
        raise DataError(f"shard {path} cannot be read as a token shard ({err}); delete it and re-run {PREPARE_HINT}") from None
    meta = {k.decode()[len("moray."):]: v.decode() for k, v in (table.schema.metadata or {}).items() if k.startswith(b"moray.")}
    return rows, meta
