"""The on-disk format of one checkpoint, and how to tell a whole one from a torn one.

    <root>/latest                      the name of the newest committed checkpoint, written last
    <root>/step_0000100/               one committed checkpoint
        .metadata, __0_0.distcp, ...   DCP's files (tensors of every rank)
        extra.json                     global extra state (rank 0)
        rank_extra.00000.pkl, ...      per-rank extra state (pickled), one per rank that gave any
        manifest.json                  written after everything above; lists every file
    <root>/step_0000200.tmp-1a2b3c4d/  a save in progress (or one that crashed)

On a store that cannot rename a directory (S3, GCS) there is no `.tmp-` stage: the
save writes into `step_NNNNNNN/` directly and the manifest alone marks it committed.
A checkpoint is loadable only if its manifest exists, parses, and every file it
lists has the recorded size and sha256. The manifest is written after all other
files, so a directory without one is, by construction, incomplete.
"""

from __future__ import annotations

import json
import pickle
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import pyarrow.fs as pafs
import torch

from moray.platform.checkpoint import fs as cfs
from moray.platform.checkpoint.records import CheckpointEntry

MANIFEST = "manifest.json"
LATEST = "latest"
EXTRA = "extra.json"
FORMAT = "moray-checkpoint/1"
_NAME = re.compile(r"^step_(\d{7,})(?:\.(tmp|old)-([0-9a-f]+))?$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def rank_extra_name(rank: int) -> str:
    return f"rank_extra.{rank:05d}.pkl"


def parse_name(name: str) -> Optional[tuple]:
    """`step_0000100` -> (100, None); `step_0000100.tmp-ab12` -> (100, "tmp"); else None."""
    m = _NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def extras_payload(rank: int, extra: Optional[Dict[str, Any]], rank_extra: Any) -> Dict[str, bytes]:
    """The extra-state files one rank writes: `extra.json` (rank 0) and its pickled `rank_extra`."""
    payload = {}
    if rank == 0:
        try:
            payload[EXTRA] = json.dumps(extra or {}, sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise TypeError(f"`extra` must be JSON-serialisable ({e}); put tensors in `state` "
                            "and other Python objects in `rank_extra`") from None
    if rank_extra is not None:
        payload[rank_extra_name(rank)] = pickle.dumps(rank_extra)
    return payload


@dataclass
class FileEntry:
    size: int
    sha256: str
    rank: int  # the rank that wrote it


@dataclass
class Manifest:
    step: int
    world_size: int
    files: Dict[str, FileEntry]
    layout: Optional[Dict[str, Any]] = None  # the writer's parallel layout, for humans and checks
    time: float = field(default_factory=time.time)
    torch_version: str = torch.__version__
    format: str = FORMAT

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        d = asdict(self)
        d["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        d["bytes"] = self.bytes
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        d = json.loads(data)
        if d.get("format") != FORMAT:
            raise ValueError(f"unknown manifest format {d.get('format')!r} (expected {FORMAT!r})")
        files = {name: FileEntry(**entry) for name, entry in d["files"].items()}
        return cls(
            step=int(d["step"]),
            world_size=int(d["world_size"]),
            files=files,
            layout=d.get("layout"),
            time=float(d["time"]),
            torch_version=d.get("torch_version", ""),
        )


class ManifestError(Exception):
    """The manifest is missing or unreadable: the checkpoint is not committed."""


def read_manifest(ckpt: cfs.Location) -> Manifest:
    try:
        data = cfs.get_bytes(ckpt.child(MANIFEST))
    except FileNotFoundError:
        raise ManifestError(f"no {MANIFEST}: the save never committed") from None
    try:
        return Manifest.from_json(data)
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{MANIFEST} is unreadable ({e})") from None


def verify_files(ckpt: cfs.Location, manifest: Manifest, names: List[str]) -> List[str]:
    """Problems with the named files of `ckpt` against `manifest` (empty: all good)."""
    problems = []
    for name in names:
        want = manifest.files[name]
        try:
            size, sha = cfs.file_digest(ckpt.child(name))
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        except OSError as e:
            problems.append(f"{name}: unreadable ({e})")
            continue
        if size != want.size:
            problems.append(f"{name}: {size} bytes, manifest says {want.size}")
        elif sha != want.sha256:
            problems.append(f"{name}: sha256 mismatch (corrupt)")
    return problems


def verify_checkpoint(path: str, filesystem: Optional[pafs.FileSystem] = None) -> List[str]:
    """Every problem that makes the checkpoint at `path` (local path or URI) unloadable.

    An empty list means the manifest is there and every file matches its checksum.
    """
    ckpt = cfs.resolve(path, filesystem)
    try:
        manifest = read_manifest(ckpt)
    except ManifestError as e:
        return [str(e)]
    return verify_files(ckpt, manifest, sorted(manifest.files))


def delete_checkpoint(ckpt: cfs.Location) -> None:
    """Uncommit (manifest first, so a crash half-way leaves nothing loadable), then delete."""
    cfs.remove_file(ckpt.child(MANIFEST))
    cfs.remove_dir(ckpt)


def read_latest(root: cfs.Location) -> Optional[str]:
    """The checkpoint name `latest` holds, or None if there is no pointer yet."""
    try:
        return cfs.get_bytes(root.child(LATEST)).decode().strip() or None
    except FileNotFoundError:
        return None


def list_checkpoints(root: cfs.Location) -> List[CheckpointEntry]:
    """Every `step_*` directory under `root`, oldest first; committed = final name + manifest."""
    entries = []
    for info in cfs.list_dir(root):
        parsed = parse_name(info.base_name)
        if parsed is None or info.type != pafs.FileType.Directory:
            continue
        ckpt = root.child(info.base_name)
        committed = parsed[1] is None and cfs.exists(ckpt.child(MANIFEST))
        entries.append(CheckpointEntry(parsed[0], str(ckpt), committed))
    return sorted(entries, key=lambda e: (e.step, not e.committed, e.path))
