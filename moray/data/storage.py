"""File access for data: local paths and pyarrow.fs URIs (s3://, gs://, ...) alike.

Every path in moray.data is a string; a URI selects pyarrow's filesystem for it,
anything else is a local path. Writes are atomic (temporary name, then move),
so a crash never leaves a half-written shard or manifest under its real name.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import pyarrow.fs as pafs


def resolve(path: str) -> Tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        if scheme == "file":
            return pafs.LocalFileSystem(), os.path.abspath(rest)
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if "://" in base else os.path.join(base, *parts)


@dataclass(frozen=True)
class FileEntry:
    rel: str  # path relative to the listed folder, "/"-separated
    size: int
    mtime_ns: int


def stat(path: str) -> FileEntry | None:
    """Size and mtime of a file, or None when it does not exist."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        return None
    return FileEntry(posixpath.basename(p), info.size, info.mtime_ns or 0)


def is_dir(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def list_files(folder: str, patterns: Sequence[str] = ("*",)) -> List[FileEntry]:
    """Files under `folder` (recursive) whose relative path matches a pattern, sorted by path."""
    fs, base = resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path.replace(os.sep, "/"), base.replace(os.sep, "/"))
        if any(fnmatch.fnmatchcase(rel, p) for p in patterns):
            out.append(FileEntry(rel, info.size, info.mtime_ns or 0))
    return sorted(out, key=lambda e: e.rel)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_range(path: str, start: int, end: int) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_file(p) as f:
        f.seek(start)
        return f.read(end - start)


def open_input(path: str):
    """A seekable pyarrow file (for parquet metadata and row groups)."""
    fs, p = resolve(path)
    return fs.open_input_file(p)


def write_atomic(path: str, data: bytes) -> None:
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, p)


def write_if_changed(path: str, data: bytes) -> bool:
    """Write only when the content differs (so mtimes prove a rerun wrote nothing)."""
    if stat(path) is not None and read_bytes(path) == data:
        return False
    write_atomic(path, data)
    return True


def delete(path: str) -> None:
    fs, p = resolve(path)
    fs.delete_file(p)
