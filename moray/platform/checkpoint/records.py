"""What the checkpoint store hands back: small records the trainer turns into events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Tuple


class CheckpointError(RuntimeError):
    """A save could not commit, or no checkpoint could be loaded; the message says why."""


class NoCheckpointError(CheckpointError):
    """Nothing was ever committed under this root (no `latest` pointer)."""


class LeaseHeldError(CheckpointError):
    """Another run holds the lease on this storage root (lease.py); the message names it."""


@dataclass
class CommitInfo:
    step: int
    path: str
    bytes: int
    files: int
    stall_s: float  # how long save() held the training loop (all of it when synchronous)
    commit_s: float  # how long the commit (in poll/wait/save) held it: gather, manifest, rename
    write_s: float  # save() until the slowest rank's files were written
    total_s: float  # save() until `latest` moved
    pruned: List[str] = field(default_factory=list)  # older checkpoints deleted (keep)
    cleaned: List[str] = field(default_factory=list)  # leftovers of crashed saves deleted

    @property
    def seconds(self) -> float:
        return self.total_s


@dataclass
class SaveHandle:
    step: int
    path: str  # where the checkpoint will be once committed
    stall_s: float
    previous: Optional[CommitInfo] = None  # the earlier save this call had to commit first
    commit: Optional[CommitInfo] = None  # set once this save is committed


@dataclass
class LoadResult:
    step: int
    path: str
    extra: Dict[str, Any]
    rank_extra: Any  # this rank's `rank_extra` at save time; None if it had none
    skipped: List[Tuple[str, str]]  # (path, reason) of newer checkpoints that were unusable
    bytes: int
    seconds: float
    # What was loaded but not all of it, e.g. an older checkpoint's pickled rank extras, which
    # are refused (rank_extra is then None): log these, the run goes on without them.
    warnings: List[str] = field(default_factory=list)
    state: Optional[Dict[str, Any]] = None  # what was filled: the template, or what `adapt` made of it


class CheckpointEntry(NamedTuple):
    step: int
    path: str
    committed: bool
