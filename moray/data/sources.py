"""Sources -> parts -> documents.

A *part* is a deterministic slice of one source (whole files, a byte range of a
JSONL file, a run of parquet row groups) sized to fill about one shard. Parts
are plain JSON-able dicts so a Ray Data task can take one, and their content
(paths, sizes, mtimes, ranges) fingerprints the shard made from them: a rerun
over unchanged inputs finds every shard already there.
"""

from __future__ import annotations

import json
from typing import Dict, Iterator, List

import pyarrow.parquet as pq

from moray.data import storage
from moray.data.config import SourceConfig

DEFAULT_GLOBS = {"code": ("*.py",), "text": ("*.txt", "*.md"), "jsonl": ("*.jsonl",), "parquet": ("*.parquet",)}


class SourceError(ValueError):
    """A source is missing or malformed; the message names it and what to do."""


def plan_parts(src: SourceConfig, target_bytes: int) -> List[Dict]:
    """Split a source into parts of about `target_bytes` input bytes, in a fixed order."""
    items = _items(src, target_bytes)
    if not items:
        patterns = ", ".join(_patterns(src))
        raise SourceError(
            f"data source {src.name!r}: no files matching {patterns} under {src.path}; "
            "check data.sources[].path / glob / format"
        )
    parts: List[Dict] = []
    group: List[list] = []
    acc = 0
    for item in items:
        group.append(item)
        acc += item[5]
        if acc >= target_bytes:
            parts.append(group)
            group, acc = [], 0
    if group:
        parts.append(group)
    base = _base(src)
    return [
        {"source": src.name, "format": src.format, "root": base, "text_field": src.text_field, "index": i, "items": g}
        for i, g in enumerate(parts)
    ]


def _patterns(src: SourceConfig):
    return (src.glob,) if src.glob else DEFAULT_GLOBS[src.format]


def _base(src: SourceConfig) -> str:
    """The folder the items' relative paths start from (a single file's parent)."""
    if storage.is_dir(src.path):
        return src.path
    if storage.stat(src.path) is None:
        raise SourceError(f"data source {src.name!r}: {src.path} does not exist; fix data.sources[].path")
    return src.path.rsplit("/", 1)[0] if "/" in src.path else "."


def _files(src: SourceConfig) -> List[storage.FileEntry]:
    base = _base(src)
    if storage.is_dir(src.path):
        return storage.list_files(base, _patterns(src))
    entry = storage.stat(src.path)
    return [storage.FileEntry(src.path.rsplit("/", 1)[-1], entry.size, entry.mtime_ns)]


def _items(src: SourceConfig, target_bytes: int) -> List[list]:
    """[rel, size, mtime_ns, start, end, nbytes]: files whole, JSONL split on lines, parquet by row group."""
    base = _base(src)
    out: List[list] = []
    for f in _files(src):
        if src.format in ("text", "code"):
            out.append([f.rel, f.size, f.mtime_ns, 0, f.size, f.size])
        elif src.format == "jsonl":
            for start, end in _line_ranges(storage.join(base, f.rel), f.size, target_bytes):
                out.append([f.rel, f.size, f.mtime_ns, start, end, end - start])
        else:
            with storage.open_input(storage.join(base, f.rel)) as fh:
                meta = pq.ParquetFile(fh).metadata
            for rg in range(meta.num_row_groups):
                out.append([f.rel, f.size, f.mtime_ns, rg, rg + 1, meta.row_group(rg).total_byte_size])
    return out


def _line_ranges(path: str, size: int, step: int) -> List[tuple]:
    """Byte ranges of about `step` bytes that start and end on line boundaries."""
    cuts = [0]
    with storage.open_input(path) as f:
        pos = step
        while pos < size:
            f.seek(pos)
            tail = b""
            while b"\n" not in tail and pos + len(tail) < size:
                tail += f.read(1 << 16)
            nl = tail.find(b"\n")
            cut = size if nl < 0 else pos + nl + 1
            if cut >= size:
                break
            cuts.append(cut)
            pos = cut + step
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def iter_documents(part: Dict) -> Iterator[str]:
    """The documents of a part, in order; empty documents are skipped."""
    fmt, base, field = part["format"], part["root"], part["text_field"]
    for item in part["items"]:
        rel, size, _, start, end = item[:5]
        path = storage.join(base, rel)
        _check_unchanged(part, path, size)
        if fmt in ("text", "code"):
            text = storage.read_bytes(path).decode("utf-8", errors="replace")
            if text.strip():
                yield text
        elif fmt == "jsonl":
            offset = start
            for line in storage.read_range(path, start, end).splitlines(keepends=True):
                if line.strip():
                    yield _jsonl_text(line, path, offset, field)
                offset += len(line)
        else:
            with storage.open_input(path) as fh:
                pf = pq.ParquetFile(fh)
                if field not in pf.schema_arrow.names:
                    raise SourceError(
                        f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        f"set data.sources[].text_field for source {part['source']!r}"
                    )
                for rg in range(start, end):
                    for text in pf.read_row_group(rg, columns=[field]).column(0).to_pylist():
                        if text and text.strip():
                            yield text


def _jsonl_text(line: bytes, path: str, offset: int, field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise SourceError(f"{path} at byte {offset}: not valid JSON ({err.msg}); fix or remove the line") from None
    text = row.get(field) if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise SourceError(
            f"{path} at byte {offset}: no string field {field!r}; set data.sources[].text_field to the document's key"
        )
    return text


def _check_unchanged(part: Dict, path: str, size: int) -> None:
    entry = storage.stat(path)
    if entry is None or entry.size != size:
        raise SourceError(
            f"{path} changed or vanished while data source {part['source']!r} was being prepared; run prepare again"
        )
