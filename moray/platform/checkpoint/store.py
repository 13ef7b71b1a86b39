"""CheckpointStore: sharded checkpoints that are written in the background and cannot be torn.

A save, on every rank (collective):
  1. rank 0 clears what this run's crashed saves left behind and names the save
     (a token);
  2. every rank hands its tensors to DCP (`async_save`: training stalls only for the
     copy to host memory; or `save` when `async_save=False`), writing under
     `step_NNNNNNN.tmp-<run_id>-<token>/` and hashing each file as it goes;
  3. at a later `poll()`/`wait()` (or at once when synchronous), once every rank's
     write is done, rank 0 writes `manifest.json`, renames the directory to
     `step_NNNNNNN/`, points `latest` at it, and deletes the oldest beyond `keep`.
On an object store (no rename) step 2 writes straight into `step_NNNNNNN/`: the
manifest, written last, is what makes it a checkpoint, and `latest` moves after it.
A crash at any moment therefore leaves `latest` on the previous complete checkpoint.

One run writes to a root at a time: its driver holds the root's lease (lease.py),
and rank 0 refuses to start a save or commit one while another run holds it. A
temporary carries its run's id, so a save clears only its own run's leftovers:
another run's, in flight or crashed, are never deleted (a store without a run_id
clears only temporaries that carry none).

`crash_hook(phase)` is called at "shards_written" (every rank, all shards done),
"manifest_written" and "before_latest" (rank 0): fault injection for tests and drills.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import pyarrow.fs as pafs
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from moray.platform.checkpoint import fs as cfs
from moray.platform.checkpoint import manifest as mf
from moray.platform.checkpoint.group import StoreGroup
from moray.platform.checkpoint.lease import check_lease, check_run_id
from moray.platform.checkpoint.records import (
    CheckpointEntry,
    CheckpointError,
    CommitInfo,
    LoadResult,
    NoCheckpointError,
    SaveHandle,
)

PHASES = ("shards_written", "manifest_written", "before_latest")


@dataclass
class _RankWrite:
    files: cfs.FileRecord
    write_s: float
    error: Optional[str] = None


@dataclass
class _Pending:
    handle: SaveHandle
    work: cfs.Location
    final: cfs.Location
    token: str
    started: float
    cleaned: List[str]
    job: Future
    crash_hook: Optional[Callable[[str], None]]  # the hook set when this save began


class CheckpointStore:
    """One run's checkpoints under `root` (a local path, a URI, or a path in `filesystem`).

    Build it on every rank at the same point (it creates two gloo groups). `keep`: how many
    committed checkpoints survive a commit. `layout`: recorded in each manifest (e.g. the
    pp/dp/tp/ep sizes). `crash_hook(phase)`: see PHASES; never set outside tests and drills.
    `run_id`: the run's id, the same on every rank and every restart of the run, and the one
    its StorageLease holds; None for tools and tests that write without a lease.
    """

    def __init__(
        self,
        root: str,
        keep: int = 3,
        rank: int = 0,
        world_size: int = 1,
        process_group: Any = None,
        async_save: bool = True,
        crash_hook: Optional[Callable[[str], None]] = None,
        *,
        layout: Optional[Dict[str, Any]] = None,
        filesystem: Optional[pafs.FileSystem] = None,
        run_id: Optional[str] = None,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (got {keep}): the newest checkpoint is always kept")
        self.run_id = None if run_id is None else check_run_id(run_id)
        self.root = cfs.resolve(root, filesystem)
        self.keep, self.rank, self.world_size = keep, rank, world_size
        self.async_save, self.crash_hook, self.layout = async_save, crash_hook, layout
        self._group = StoreGroup(rank, world_size, process_group)
        self._pending: Optional[_Pending] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moray-ckpt")

    # --- saving ---------------------------------------------------------------------

    def save(self, step: int, state: Dict[str, Any], extra: Optional[Dict[str, Any]] = None,
             rank_extra: Any = None) -> SaveHandle:
        """Start saving `state` (tensors/DTensors) with `extra` (JSON, rank 0's is kept) and
        `rank_extra` (JSON, one per rank; see rng.py for RNG state). Collective. Commits any
        earlier save first."""
        previous = self.wait() if self._pending is not None else None
        started = time.perf_counter()
        payload: Dict[str, bytes] = {}

        def prepare():  # a bad `extra` on any rank fails the save on every rank
            payload.update(mf.extras_payload(self.rank, extra, rank_extra))  # captured now
            return self._prepare(step) if self.rank == 0 else None

        token, cleaned = self._group.agree(prepare)
        final = self.root.child(mf.checkpoint_name(step))
        work = self.root.child(f"{final.name}.tmp-{self._tag(token)}") if self.root.can_rename else final
        record: cfs.FileRecord = {}
        writer = cfs.dcp_writer(work, record)
        if self.async_save:
            response = dcp.async_save(state, storage_writer=writer, process_group=self._group.dcp,
                                      async_checkpointer_type=AsyncCheckpointerType.THREAD)
            upload = getattr(response, "upload_completion", response)  # torch >= 2.9 may wrap it
            job = self._executor.submit(self._finish_write, upload.result, work, record, payload, started)
        else:
            dcp.save(state, storage_writer=writer, process_group=self._group.dcp)
            job = Future()
            job.set_result(self._finish_write(lambda: None, work, record, payload, started))
        handle = SaveHandle(step, str(final), time.perf_counter() - started, previous)
        self._pending = _Pending(handle, work, final, token, started, cleaned, job, self.crash_hook)
        if not self.async_save:
            self._commit()
            handle.stall_s = time.perf_counter() - started
        return handle

    def poll(self) -> Optional[CommitInfo]:
        """Commit the pending save if every rank has finished writing; else return None at once.
        Collective: call it on every rank at the same step boundary."""
        if self._pending is None or not self._group.all_true(self._pending.job.done()):
            return None
        return self._commit()

    def wait(self) -> Optional[CommitInfo]:
        """Block until the pending save (if any) is written everywhere and committed. Collective."""
        if self._pending is None:
            return None
        self._pending.job.result()
        return self._commit()

    @property
    def pending_step(self) -> Optional[int]:
        """The step of the save in flight (written or not, but not yet committed), if any."""
        return self._pending.handle.step if self._pending else None

    def close(self) -> Optional[CommitInfo]:
        """Commit the pending save, then stop the background thread. Collective."""
        info = self.wait()
        self._executor.shutdown(wait=True)
        return info

    def _prepare(self, step: int) -> Tuple[str, List[str]]:
        """Rank 0, with no save in flight: delete what this run's crashed saves left; name
        this save."""
        check_lease(self.root, self.run_id, f"save step {step}")
        cfs.make_dir(self.root)
        cleaned = []
        for info in cfs.list_dir(self.root):
            if info.base_name.startswith(mf.LATEST + ".tmp-"):  # a pointer update cut short
                cfs.remove_file(self.root.child(info.base_name))
            parsed = mf.parse_name(info.base_name)
            if parsed is None or info.type != pafs.FileType.Directory:
                continue
            loc = self.root.child(info.base_name)
            if self.root.can_rename:  # this run's .tmp-* or .old-*
                doomed = parsed.kind is not None and parsed.run_id == self.run_id
            elif cfs.exists(loc.child(mf.MANIFEST)):  # committed, and about to be rewritten
                doomed = parsed.step == step
            else:  # written in place and uncommitted: in flight, or crashed
                owner = mf.read_writer(loc)
                if owner != self.run_id and parsed.step == step:
                    who = f"run {owner!r}" if owner else "a writer without a run_id"
                    raise CheckpointError(
                        f"{loc} is an unfinished save of step {step} by {who}, not this run "
                        f"({self.run_id!r}): two runs are writing to {self.root}. Give each its own "
                        "train.storage; if that run is gone, delete the directory")
                doomed = owner == self.run_id
            if doomed:
                mf.delete_checkpoint(loc)
                cleaned.append(str(loc))
        if not self.root.can_rename:  # in place: say whose save it is until the manifest does
            final = self.root.child(mf.checkpoint_name(step))
            cfs.make_dir(final)
            cfs.put_bytes(final.child(mf.WRITER), json.dumps({"run_id": self.run_id}).encode())
        return uuid.uuid4().hex[:8], cleaned

    def _tag(self, token: str) -> str:
        """What names this save's temporaries: its run and its token."""
        return f"{self.run_id}-{token}" if self.run_id else token

    def _finish_write(self, wait_upload, work, record, payload, started) -> _RankWrite:
        """Background (or inline): wait for DCP's files, then write this rank's extras."""
        try:
            wait_upload()
            for name, data in payload.items():
                cfs.put_bytes(work.child(name), data)
                record[name] = (len(data), cfs.sha256_hex(data))
            return _RankWrite(dict(record), time.perf_counter() - started)
        except (Exception, CheckpointException) as e:  # reported at commit, on every rank
            why = _failures(e) if isinstance(e, CheckpointException) else f"{type(e).__name__}: {e}"
            return _RankWrite({}, time.perf_counter() - started, f"rank {self.rank}: {why}")

    def _commit(self) -> CommitInfo:
        pending, self._pending = self._pending, None
        began = time.perf_counter()
        writes = self._group.all_gather(pending.job.result())

        def commit_on_rank0() -> CommitInfo:
            self._crash_point(pending, "shards_written")
            return self._promote(pending, writes, began) if self.rank == 0 else None

        info = self._group.agree(commit_on_rank0)
        pending.handle.commit = info
        return info

    def _promote(self, p: _Pending, writes: List[_RankWrite], began: float) -> CommitInfo:
        errors = [w.error for w in writes if w.error]
        if errors:
            raise CheckpointError(f"saving step {p.handle.step} failed: " + "; ".join(errors))
        check_lease(self.root, self.run_id, f"commit step {p.handle.step}")  # before the manifest commits it
        files = {name: mf.FileEntry(size, sha, r) for r, w in enumerate(writes)
                 for name, (size, sha) in w.files.items()}
        stored = {i.base_name: i.size for i in cfs.list_dir(p.work) if i.type == pafs.FileType.File}
        lost = sorted(n for n, e in files.items() if stored.get(n) != e.size)
        if lost:
            raise CheckpointError(f"{p.work}: written files missing or short on the store: {lost}")
        manifest = mf.Manifest(p.handle.step, self.world_size, files, self.layout)
        cfs.put_bytes(p.work.child(mf.MANIFEST), manifest.to_json())
        self._crash_point(p, "manifest_written")
        if p.work != p.final:
            aside = self.root.child(f"{p.final.name}.old-{self._tag(p.token)}")
            if cfs.exists(p.final):  # an earlier save of this step that `latest` moved past
                cfs.move(p.final, aside)
            cfs.move(p.work, p.final)
            cfs.remove_dir(aside)
        self._crash_point(p, "before_latest")
        cfs.put_bytes(self.root.child(mf.LATEST), (p.final.name + "\n").encode())
        now = time.perf_counter()
        return CommitInfo(
            step=p.handle.step, path=str(p.final), bytes=manifest.bytes, files=len(files),
            stall_s=p.handle.stall_s if self.async_save else now - p.started,
            commit_s=now - began, write_s=max(w.write_s for w in writes), total_s=now - p.started,
            pruned=self._prune(p.handle.step), cleaned=p.cleaned)

    def _prune(self, step: int) -> List[str]:
        """Delete committed checkpoints older than the newest `keep` up to `step`."""
        older = [e for e in self.list_checkpoints() if e.committed and e.step < step]
        doomed = older[: max(0, len(older) - (self.keep - 1))]
        for e in doomed:
            mf.delete_checkpoint(self.root.child(mf.checkpoint_name(e.step)))
        return [e.path for e in doomed]

    @staticmethod
    def _crash_point(p: _Pending, phase: str) -> None:
        if p.crash_hook is not None:
            p.crash_hook(phase)

    # --- finding and loading ------------------------------------------------------------

    def latest_step(self) -> Optional[int]:
        """The step `latest` names, or None if nothing was ever committed. Not collective."""
        name = mf.read_latest(self.root)
        parsed = mf.parse_name(name) if name else None
        return parsed[0] if parsed else None

    def list_checkpoints(self) -> List[CheckpointEntry]:
        """Every `step_*` directory under the root, oldest first, in-progress ones included."""
        return mf.list_checkpoints(self.root)

    def load(self, state_template: Dict[str, Any],
             path_or_step: Union[None, int, str] = None,
             adapt: Optional[Callable[[Dict[str, Any], Set[str]], Dict[str, Any]]] = None) -> LoadResult:
        """Fill `state_template` in place (DCP reshards into its layout) from the newest
        loadable checkpoint: `latest`, else the ones before it, each verified against its
        manifest first. `path_or_step` names one checkpoint instead (no fallback). Collective.

        `adapt(template, keys_in_checkpoint)` may return another template to load into, for a
        checkpoint that holds other keys than the template asks for (a float32 run's, read by a
        bfloat16 one); what was filled is `LoadResult.state` (the template itself without it)."""
        if self._pending is not None:
            self.wait()
        started = time.perf_counter()
        explicit = path_or_step is not None
        if explicit:
            candidates = [self._locate(path_or_step)]
        else:
            names = self._group.agree(lambda: self._candidates() if self.rank == 0 else None)
            candidates = [self.root.child(n) for n in names]
        skipped: List[Tuple[str, str]] = []
        for ckpt in candidates:
            manifest, problems = self._verify(ckpt)
            if problems:
                if explicit:
                    raise CheckpointError(f"checkpoint {ckpt} is not loadable: " + "; ".join(problems))
                skipped.append((str(ckpt), "; ".join(problems)))
                continue
            reader = cfs.dcp_reader(ckpt)
            target = state_template
            if adapt is not None:
                target = adapt(state_template, set(reader.read_metadata().state_dict_metadata))
            try:
                dcp.load(target, storage_reader=reader, process_group=self._group.dcp)
            except CheckpointException as e:  # a BaseException: make it one callers catch
                raise CheckpointError(f"loading {ckpt} failed: " + _failures(e)) from None
            extra = json.loads(cfs.get_bytes(ckpt.child(mf.EXTRA))) if mf.EXTRA in manifest.files else {}
            rank_extra, warnings = self._rank_extra(ckpt, manifest)
            return LoadResult(manifest.step, str(ckpt), extra, rank_extra, skipped, manifest.bytes,
                              time.perf_counter() - started, warnings, target)
        reasons = "; ".join(f"{path}: {why}" for path, why in skipped)
        raise CheckpointError(f"no loadable checkpoint under {self.root}: {reasons}")

    def _rank_extra(self, ckpt: cfs.Location, manifest: mf.Manifest) -> Tuple[Any, List[str]]:
        """This rank's `rank_extra` (JSON), and warnings. An older moray pickled it; unpickling
        runs code from the checkpoint, so such extras are refused and the rest still loads."""
        name = mf.rank_extra_name(self.rank)
        if name in manifest.files:
            return json.loads(cfs.get_bytes(ckpt.child(name))), []
        legacy = mf.legacy_rank_extra_name(self.rank)
        if legacy in manifest.files:
            return None, [f"{ckpt.child(legacy)}: this checkpoint was written by an older moray, which "
                          "pickled per-rank extras; loading them would run code from the checkpoint, so "
                          "they are ignored (rank_extra is None: e.g. RNG state is not restored). "
                          "The next checkpoint saved holds them as JSON"]
        return None, []

    def _candidates(self) -> List[str]:
        """Rank 0: `latest`'s checkpoint, then every older one, newest first."""
        name = mf.read_latest(self.root)
        parsed = mf.parse_name(name) if name else None
        if parsed is None or parsed[1] is not None:
            raise NoCheckpointError(
                f"no committed checkpoint under {self.root}: `latest` is "
                f"{'missing' if name is None else repr(name)}; start fresh or name a checkpoint")
        older = [mf.checkpoint_name(e.step) for e in self.list_checkpoints()
                 if e.step < parsed[0] and mf.parse_name(posixpath.basename(e.path))[1] is None]
        return [name] + older[::-1]

    def _locate(self, path_or_step: Union[int, str]) -> cfs.Location:
        if isinstance(path_or_step, int) or path_or_step.isdigit():
            return self.root.child(mf.checkpoint_name(int(path_or_step)))
        if "://" in path_or_step:
            return cfs.resolve(path_or_step)
        if "/" not in path_or_step:  # a checkpoint's name under the root
            return self.root.child(path_or_step)
        if self.root.is_local or self.root.scheme:
            return cfs.resolve(path_or_step)
        return cfs.Location(self.root.fs, path_or_step)  # a path inside the given filesystem

    def _verify(self, ckpt: cfs.Location) -> Tuple[Optional[mf.Manifest], List[str]]:
        """Collective: rank 0 reads the manifest; each rank checksums its share of the files."""
        def read() -> Union[mf.Manifest, str]:
            try:
                return mf.read_manifest(ckpt)
            except (mf.ManifestError, OSError) as e:
                return str(e)

        manifest = self._group.agree(lambda: read() if self.rank == 0 else None)
        if isinstance(manifest, str):
            return None, [manifest]
        share = sorted(manifest.files)[self.rank::self.world_size]
        problems = self._group.all_gather(mf.verify_files(ckpt, manifest, share))
        return manifest, [p for rank_problems in problems for p in rank_problems]


def _failures(e: CheckpointException) -> str:
    """What failed inside DCP, rank by rank, without its tracebacks."""
    return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in e.failures.items())
