"""Where checkpoints live: a local path or a pyarrow.fs URI, and DCP's I/O over it.

Everything outside DCP's own shard I/O goes through `pyarrow.fs` (a local path
becomes a `LocalFileSystem`), so one code path serves `/runs/x`, `file://`,
`s3://` and `gs://`. DCP writes shards through `FileSystemWriter` with its
`fs` attribute swapped (the pattern of DCP's own `FsspecWriter`): on a local
path that is DCP's local file system, on anything else `_ArrowFS` below, which
streams straight to the store. Either way every file written is hashed while
it is written (`_HashingStream`), so the manifest's checksums cost no second
read and no local staging copy.

Object stores cannot rename a directory: `Location.can_rename` says whether
the store can, and the store picks its commit protocol from it.

Reading runs no code from the checkpoint: DCP's `.metadata` is a pickle, so
`dcp_reader` unpickles it with only the classes DCP metadata is made of, and
the non-tensor values DCP pickles go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import posixpath
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pyarrow.fs as pafs
import torch
from torch.distributed.checkpoint.filesystem import (
    FileSystem as _DcpLocalFS,
    FileSystemBase,
    FileSystemReader,
    FileSystemWriter,
)
from torch.distributed.checkpoint.metadata import StorageMeta

_CHUNK = 8 << 20  # read size when hashing a file back


@dataclass(frozen=True)
class Location:
    """A directory or file on some pyarrow file system."""

    fs: pafs.FileSystem
    path: str
    scheme: str = ""  # "s3", "gs", "file", ... when given as a URI; "" for a plain path

    @property
    def is_local(self) -> bool:
        return self.fs.type_name == "local"

    @property
    def can_rename(self) -> bool:
        """True where moving a directory is one atomic rename (local disks, HDFS)."""
        fs = self.fs
        while fs.type_name == "subtree":
            fs = fs.base_fs
        return fs.type_name in ("local", "hdfs")

    def child(self, name: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, name), self.scheme)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def __str__(self) -> str:
        if self.scheme and self.scheme != "file":
            return f"{self.scheme}://{self.path}"
        return self.path


def resolve(root: str, filesystem: Optional[pafs.FileSystem] = None) -> Location:
    """A local path, a URI (`file://`, `s3://`, `gs://`, ...), or a path inside `filesystem`."""
    root = os.fspath(root)
    if filesystem is not None:
        return Location(filesystem, root.rstrip("/") or "/")
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        return Location(fs, path.rstrip("/") or "/", root.split("://", 1)[0])
    return Location(pafs.LocalFileSystem(), os.path.abspath(root))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def list_dir(loc: Location) -> List[pafs.FileInfo]:
    """The entries directly under `loc`; none if it does not exist."""
    return loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))


def make_dir(loc: Location) -> None:
    loc.fs.create_dir(loc.path, recursive=True)


def remove_dir(loc: Location) -> None:
    try:
        loc.fs.delete_dir(loc.path)
    except FileNotFoundError:
        pass


def remove_file(loc: Location) -> None:
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        pass


def move(src: Location, dst: Location) -> None:
    src.fs.move(src.path, dst.path)


def get_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def put_bytes(loc: Location, data: bytes) -> None:
    """Write a small file so that a reader sees the old content or the new, never a mix.

    Locally: a temporary file, fsync, then rename over the target. On a store that
    can rename: a temporary object, then move. On an object store a single PUT is
    already all-or-nothing.
    """
    if loc.is_local:
        tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, loc.path)
        return
    if loc.can_rename:
        tmp = Location(loc.fs, f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}", loc.scheme)
        with tmp.fs.open_output_stream(tmp.path) as f:
            f.write(data)
        move(tmp, loc)
        return
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(data)


def file_digest(loc: Location) -> Tuple[int, str]:
    """(size, sha256) of a stored file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with loc.fs.open_input_stream(loc.path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


# --- DCP over a Location, hashing as it writes ------------------------------------------


FileRecord = Dict[str, Tuple[int, str]]  # file name in the checkpoint dir -> (size, sha256)


class _HashingStream(io.RawIOBase):
    """A write-only stream that hashes and counts the bytes on their way to `raw`."""

    def __init__(self, raw, on_close):
        self._raw, self._on_close = raw, on_close
        self._hash, self._size = hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        self._hash.update(view)
        self._raw.write(view)
        self._size += len(view)
        return len(view)

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        if not self._raw.closed:  # IOBase.close flushes too, after `raw` may be gone
            self._raw.flush()

    def fileno(self) -> int:  # DCP fsyncs local files through this
        self._raw.flush()
        return self._raw.fileno()

    def finish(self) -> None:
        self._on_close(self._size, self._hash.hexdigest())


@contextmanager
def _hashed(raw, path, record: FileRecord) -> Iterator[io.IOBase]:
    """Yield a hashing stream over `raw`; record the file only if it was written whole."""
    name = posixpath.basename(os.fspath(path))
    stream = _HashingStream(raw, lambda size, sha: record.__setitem__(name, (size, sha)))
    with raw:
        yield stream
        stream.flush()
    stream.finish()


class _LocalFS(_DcpLocalFS):
    """DCP's local file system, recording (size, sha256) of every file written."""

    def __init__(self, record: Optional[FileRecord] = None):
        self.record = {} if record is None else record

    @contextmanager
    def create_stream(self, path, mode):
        if "r" in mode:
            with Path(path).open(mode) as f:
                yield f
            return
        with _hashed(Path(path).open(mode), path, self.record) as stream:
            yield stream

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        _rename_record(self.record, path, new_path)


class _ArrowFS(FileSystemBase):
    """DCP's FileSystemBase over a pyarrow file system (S3, GCS, HDFS, ...)."""

    def __init__(self, fs: pafs.FileSystem, record: Optional[FileRecord] = None):
        self.fs, self.record = fs, {} if record is None else record

    @contextmanager
    def create_stream(self, path, mode):
        path = os.fspath(path)
        if "r" in mode:  # DCP seeks inside shard files, so open for random access
            with self.fs.open_input_file(path) as f:
                yield f
            return
        with _hashed(self.fs.open_output_stream(path), path, self.record) as stream:
            yield stream

    def concat_path(self, path, suffix):
        return posixpath.join(os.fspath(path), suffix)

    def init_path(self, path):
        return os.fspath(path)

    def rename(self, path, new_path) -> None:
        self.fs.move(os.fspath(path), os.fspath(new_path))
        _rename_record(self.record, path, new_path)

    def mkdir(self, path) -> None:
        self.fs.create_dir(os.fspath(path), recursive=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False  # only ever handed over explicitly, never inferred from an id

    def exists(self, path) -> bool:
        return self.fs.get_file_info(os.fspath(path)).type != pafs.FileType.NotFound

    def rm_file(self, path) -> None:
        self.fs.delete_file(os.fspath(path))

    def ls(self, path) -> List[str]:
        return [i.path for i in self.fs.get_file_info(pafs.FileSelector(os.fspath(path)))]


def _rename_record(record: FileRecord, path, new_path) -> None:
    old = posixpath.basename(os.fspath(path))
    if old in record:
        record[posixpath.basename(os.fspath(new_path))] = record.pop(old)


def dcp_writer(loc: Location, record: FileRecord) -> FileSystemWriter:
    """A DCP StorageWriter into `loc` that fills `record` with what each file held."""
    if loc.is_local:
        writer = FileSystemWriter(loc.path, sync_files=True)
        writer.fs = _LocalFS(record)
    else:  # object stores make a closed object durable; there is nothing to fsync
        writer = FileSystemWriter(loc.path, sync_files=False)
        writer.fs = _ArrowFS(loc.fs, record)
    writer.path = writer.fs.init_path(loc.path)
    return writer


def dcp_reader(loc: Location) -> FileSystemReader:
    """A DCP StorageReader over `loc` that runs no code from what it reads."""
    reader = _SafeReader(loc.path)
    if not loc.is_local:
        reader.fs = _ArrowFS(loc.fs)
        reader.path = reader.fs.init_path(loc.path)
    return reader


# --- reading without running code from the checkpoint ----------------------------------

_METADATA_CLASSES = {  # what DCP's `.metadata` pickle is made of
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a lookup of torch.strided & co by name
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # checkpoint_id
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(
                f"checkpoint metadata refers to {module}.{name}, which is not part of DCP's metadata: "
                "refusing to load it, since unpickling it could run code from the checkpoint")
        return super().find_class(module, name)


class _SafeReader(FileSystemReader):
    """DCP's reader, with `.metadata` unpickled by `_MetadataUnpickler`, and the planner handed
    pickled non-tensor values only after `torch.load(weights_only=True)` has read them."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")  # DCP's names: `.metadata`, or `__<rank>.metadata` per rank
        path = self.fs.concat_path(self.path, ".metadata" if rank is None else f"__{rank}.metadata")
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _WeightsOnlyBytes(planner))


class _WeightsOnlyBytes:
    """A load planner's stand-in: DCP's default planner reads byte items with
    torch.load(weights_only=False); this reads them with weights_only=True (tensors and plain
    data only) and hands the planner that result, re-serialised, instead."""

    def __init__(self, planner):
        self._planner = planner

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        safe = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), safe)
        safe.seek(0)
        self._planner.load_bytes(read_item, safe)
