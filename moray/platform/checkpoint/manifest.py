"""The on-disk format of one checkpoint, and how to tell a whole one from a torn one.

    <root>/latest                      the name of the newest committed checkpoint, written last
    <root>/step_0000100/               one committed checkpoint
        .metadata, __0_0.distcp, ...   DCP's files (tensors of every rank)
        extra.json                     global extra state (rank 0)
        rank_extra.00000.json, ...     per-rank extra state, one per rank that gave any
        manifest.json                  written after everything above; lists every file
    <root>/step_0000200.tmp-<run_id>-1a2b3c4d/  a save in progress (or one that crashed)
    <root>/lease.json                  which run writes here now (lease.py)

Extras are JSON, never pickles: loading a checkpoint must not run code from it.
Checkpoints by older versions hold `rank_extra.NNNNN.pkl`; those are never read.
A temporary carries its run's id, so a run clears only its own crashed saves.
On a store that cannot rename a directory (S3, GCS) there is no `.tmp-` stage: the
save writes into `step_NNNNNNN/` directly, with `writer.json` naming its run, and
the manifest alone marks it committed.
A checkpoint is loadable only if its manifest exists, parses, and every file it
lists has the recorded size and sha256. The manifest is written after all other
files, so a directory without one is, by construction, incomplete.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional

import pyarrow.fs as pafs
import torch

from moray.platform.checkpoint import fs as cfs
from moray.platform.checkpoint.records import CheckpointEntry

MANIFEST = "manifest.json"
LATEST = "latest"
EXTRA = "extra.json"
WRITER = "writer.json"  # in an in-place save (object stores): the run writing it
FORMAT = "moray-checkpoint/1"
# step_0000100, step_0000100.tmp-1a2b3c4d (no run id), step_0000100.tmp-<run_id>-1a2b3c4d
_NAME = re.compile(r"^step_(\d{7,})(?:\.(tmp|old)-(?:([A-Za-z0-9_.-]+)-)?([0-9a-f]{8}))?$")


class ParsedName(NamedTuple):
    step: int
    kind: Optional[str]  # None for a checkpoint, "tmp" / "old" for a save's temporaries
    run_id: Optional[str]  # the run that made the temporary (None: made without a run id)


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def rank_extra_name(rank: int) -> str:
    return f"rank_extra.{rank:05d}.json"


def legacy_rank_extra_name(rank: int) -> str:
    """Where versions that pickled per-rank extras put them (never unpickled)."""
    return f"rank_extra.{rank:05d}.pkl"


def parse_name(name: str) -> Optional[ParsedName]:
    """`step_0000100` -> (100, None, None); `step_0000100.tmp-r1-1a2b3c4d` -> (100, "tmp", "r1")."""
    m = _NAME.match(name)
    return ParsedName(int(m.group(1)), m.group(2), m.group(3)) if m else None


def extras_payload(rank: int, extra: Optional[Dict[str, Any]], rank_extra: Any) -> Dict[str, bytes]:
    """The extra-state files one rank writes: `extra.json` (rank 0) and its `rank_extra`."""
    payload = {}
    if rank == 0:
        payload[EXTRA] = to_json("extra", extra or {})
    if rank_extra is not None:
        payload[rank_extra_name(rank)] = to_json("rank_extra", rank_extra)
    return payload


def to_json(what: str, value: Any) -> bytes:
    """`value` as JSON, refusing what would not come back as it went in (tensors, arrays,
    objects, non-string keys), with the place and type of the first such thing."""
    bad = _first_non_json(value, what)
    if bad:
        where, kind = bad
        raise TypeError(
            f"`{what}` must be JSON-serialisable: {where} is a {kind}. Convert tensors and arrays "
            "to lists (`t.tolist()`), numpy scalars to int/float, and RNG states with "
            "moray.platform.checkpoint.rng_state_json(); put large tensors in `state`")
    return json.dumps(value, sort_keys=True).encode()


def _first_non_json(value: Any, where: str) -> Optional[tuple]:
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} key {k!r}", f"{type(k).__name__} (JSON keys are strings)"
            if bad := _first_non_json(v, f"{where}[{k!r}]"):
                return bad
        return None
    if isinstance(value, (list, tuple)):  # a tuple comes back as a list
        for i, v in enumerate(value):
            if bad := _first_non_json(v, f"{where}[{i}]"):
                return bad
        return None
    module = type(value).__module__
    return where, type(value).__qualname__ if module == "builtins" else f"{module}.{type(value).__qualname__}"


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


def read_writer(ckpt: cfs.Location) -> Optional[str]:
    """The run id an in-place save recorded in `writer.json` (None: none recorded)."""
    try:
        return json.loads(cfs.get_bytes(ckpt.child(WRITER))).get("run_id")
    except (FileNotFoundError, ValueError, AttributeError):
        return None


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
