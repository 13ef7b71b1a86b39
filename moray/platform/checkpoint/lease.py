"""A lease on a checkpoint storage root, so that one run at a time writes there.

Two runs pointed at one `train.storage` would otherwise clear each other's saves
in flight and move each other's `latest`. The run's driver takes the lease before
it starts workers, renews it while the run lasts and gives it back at the end;
every CheckpointStore of the run carries the same `run_id`, and its rank 0 will
not save or commit while another run holds a live lease (`check_lease`).

    <root>/lease.json   {"run_id", "run_name", "host", "pid", "started", "renewed", "ttl_s", ...}

A lease is live until `ttl_s` after its last renewal; then anyone may take it over
(its holder stopped renewing: it died, or lost its storage). A holder on this host
whose process is gone is taken over at once. Expiry compares the wall clocks of two
hosts, so they must agree to well within the TTL (NTP does).

Atomicity. On a local or NFS path the lease is created by hard-linking a fully
written file into place (`link` fails if the name exists: one creator wins, and no
reader sees half a file); a stale lease is first renamed aside (one renamer wins)
and checked to be the one judged stale. pyarrow has no create-if-absent for object
stores, so there a taker writes and reads back: best effort, two takers within one
round trip of each other may both believe they won. Renewal is read-check-write; it
can only race with a takeover, which needs the lease to have gone unrenewed a TTL.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Optional, Union

import pyarrow.fs as pafs

from moray.platform.checkpoint import fs as cfs
from moray.platform.checkpoint.records import CheckpointError, LeaseHeldError

LEASE = "lease.json"
FORMAT = "moray-lease/1"
DEFAULT_TTL_S = 120.0
_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # it goes into temporaries' names
_TRIES = 5  # rounds of a takeover race before giving up
_log = logging.getLogger(__name__)


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(f"run_id {run_id!r} must be 1-64 characters of letters, digits, '_', '.' "
                         "and '-' (it becomes part of file names)")
    return run_id


@dataclass(frozen=True)
class LeaseHolder:
    run_id: str
    run_name: str
    host: str
    pid: int
    started: float  # time.time() when acquired
    renewed: float  # time.time() of the last renewal
    ttl_s: float  # the holder promises to renew within this
    token: str  # one holder: two drivers of one run_id are still two holders
    pid_ns: str = ""  # the pid namespace of `pid`: two containers may share a host name

    @property
    def expires(self) -> float:
        return self.renewed + self.ttl_s

    def is_stale(self) -> bool:
        """Expired, or held by a process of this host (and pid namespace) that is gone."""
        if time.time() >= self.expires:
            return True
        return (self.host, self.pid_ns) == (socket.gethostname(), _pid_namespace()) and not _alive(self.pid)

    def describe(self) -> str:
        return (f"run {self.run_name or '?'!r} (run_id {self.run_id}, pid {self.pid} on {self.host}, "
                f"since {_utc(self.started)}, renewed {time.time() - self.renewed:.0f} s ago)")

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1, sort_keys=True).encode()


def read_lease(root: Union[str, cfs.Location], filesystem: Optional[pafs.FileSystem] = None
               ) -> Optional[LeaseHolder]:
    """Who holds the lease on `root` (live or not: see `is_stale`), or None if nobody does."""
    root = root if isinstance(root, cfs.Location) else cfs.resolve(root, filesystem)
    raw = _read_raw(root.child(LEASE))
    return None if raw is None else _parse(root.child(LEASE), raw)


def check_lease(root: cfs.Location, run_id: Optional[str], doing: str) -> None:
    """Raise LeaseHeldError if a live lease on `root` is held by a run other than `run_id`."""
    holder = read_lease(root)
    if holder is not None and holder.run_id != run_id and not holder.is_stale():
        mine = f"this run (run_id {run_id})" if run_id else "a store without a run_id"
        raise LeaseHeldError(
            f"cannot {doing}: {mine} does not hold the lease on {root}, {holder.describe()} does; "
            "nothing was committed and `latest` did not move. Two runs are writing to one storage "
            "root: stop one, or point train.storage elsewhere")


class StorageLease:
    """This run's claim on a checkpoint storage root (see the module doc).

        lease = StorageLease(storage, run_id, run_name).acquire()   # LeaseHeldError if taken
        lease.start_heartbeat()                                       # renews every ttl_s / 4
        ...
        lease.release()

    or `with StorageLease(...) as lease:`. `break_hint` is what the refusal tells the user to
    do to break a dead run's lease (the CLI's flag, say); the API is `acquire(force=True)`.
    """

    def __init__(self, root: str, run_id: str, run_name: str = "", *, ttl_s: float = DEFAULT_TTL_S,
                 filesystem: Optional[pafs.FileSystem] = None,
                 break_hint: str = "StorageLease.acquire(force=True)"):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0 (got {ttl_s})")
        self.root = cfs.resolve(root, filesystem)
        self.run_id, self.run_name = check_run_id(run_id), run_name
        self.ttl_s, self.break_hint = float(ttl_s), break_hint
        self.lost: Optional[LeaseHeldError] = None  # set by the heartbeat once another run took over
        self._loc = self.root.child(LEASE)
        self._token = uuid.uuid4().hex[:12]
        self._record: Optional[LeaseHolder] = None  # ours as last written; None while not held
        self._lock = threading.Lock()  # renewals (heartbeat thread) against release
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def held(self) -> bool:
        return self._record is not None

    def acquire(self, force: bool = False) -> "StorageLease":
        """Take the lease; refuse with LeaseHeldError while another holder's is live, unless
        `force` (only for a holder known to be dead: a live one would go on writing)."""
        cfs.make_dir(self.root)
        for _ in range(_TRIES):
            raw = _read_raw(self._loc)
            holder = None if raw is None else _parse(self._loc, raw, lenient=force)
            if holder is not None and holder.token != self._token and not holder.is_stale() and not force:
                raise LeaseHeldError(self._held_message(holder))
            now = time.time()
            mine = LeaseHolder(self.run_id, self.run_name, socket.gethostname(), os.getpid(), now, now,
                               self.ttl_s, self._token, _pid_namespace())
            if self._take(raw, mine.to_json()):
                self._record, self.lost = mine, None
                return self
        holder = read_lease(self.root)  # the race was lost to whoever holds it now
        raise LeaseHeldError(self._held_message(holder) if holder else
                             f"the lease on {self.root} kept changing hands; try again")

    def renew(self) -> None:
        """Move the expiry on; LeaseHeldError if another run has taken the lease over."""
        with self._lock:
            if self._record is None:
                raise CheckpointError(f"the lease on {self.root} is not held: call acquire() first")
            raw = _read_raw(self._loc)
            holder = None if raw is None else _parse(self._loc, raw, lenient=True)
            if holder is None or holder.token != self._token:
                self._record = None
                who = holder.describe() if holder else "nobody (lease.json was removed)"
                raise LeaseHeldError(f"lost the lease on {self.root}: it is now held by {who}; this run "
                                     "must stop writing checkpoints there")
            mine = replace(self._record, renewed=time.time())
            cfs.put_bytes(self._loc, mine.to_json())
            self._record = mine

    def release(self) -> bool:
        """Stop renewing and remove the lease if it is still ours; True if it was removed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._record is None:
                return False
            self._record = None
            raw = _read_raw(self._loc)
            holder = None if raw is None else _parse(self._loc, raw, lenient=True)
            if holder is None or holder.token != self._token:
                return False  # someone took it over: theirs now
            cfs.remove_file(self._loc)
            return True

    def start_heartbeat(self, interval_s: Optional[float] = None) -> None:
        """Renew from a daemon thread every `interval_s` (default ttl_s / 4) until release().
        A lost lease stops it and is kept in `lost`; a failed renewal is retried."""
        if self._record is None:
            raise CheckpointError(f"the lease on {self.root} is not held: call acquire() first")
        if self._thread is not None:
            return
        interval = self.ttl_s / 4 if interval_s is None else interval_s
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True,
                                        name="moray-lease")
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LeaseHeldError as e:
                self.lost = e
                _log.error("%s", e)
                return
            except Exception as e:  # a storage hiccup: the lease stays ours until it expires
                _log.warning("renewing the lease on %s failed (will retry): %s", self.root, e)

    def __enter__(self) -> "StorageLease":
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _take(self, raw: Optional[bytes], data: bytes) -> bool:
        """Replace the lease whose content was `raw` (None: there was none) with `data`."""
        if not self._loc.is_local:  # object store: write, read back (best effort)
            if _read_raw(self._loc) != raw:
                return False
            with self._loc.fs.open_output_stream(self._loc.path) as f:
                f.write(data)
            return _read_raw(self._loc) == data
        path = self._loc.path
        if raw is not None:  # rename the stale lease aside: if two try, one finds it gone
            aside = f"{path}.stale-{self._token}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return False
            moved = _read_raw(cfs.Location(self._loc.fs, aside))
            if moved != raw:  # a new holder's lease, written since we read: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                os.unlink(aside)
                return False
            os.unlink(aside)
        return _create_local(path, data, self._token)

    def _held_message(self, holder: LeaseHolder) -> str:
        wait = max(0.0, holder.expires - time.time())
        return (f"checkpoint storage {self.root} is in use: {holder.describe()} holds its lease "
                f"({self._loc}). Wait for that run to finish, or point train.storage at another path. "
                f"If that run is dead, its lease expires in {wait:.0f} s (at {_utc(holder.expires)}) "
                f"unless renewed, or break it now with {self.break_hint}")


def _create_local(path: str, data: bytes, token: str) -> bool:
    """Create `path` holding `data` unless it exists; True if this call created it."""
    tmp = f"{path}.tmp-{token}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _read_raw(loc: cfs.Location) -> Optional[bytes]:
    try:
        return cfs.get_bytes(loc)
    except FileNotFoundError:
        return None


def _parse(loc: cfs.Location, raw: bytes, lenient: bool = False) -> Optional[LeaseHolder]:
    """The holder in `raw`; an unreadable lease raises, or is None if `lenient`."""
    try:
        d = json.loads(raw)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
        return LeaseHolder(**d)
    except (ValueError, TypeError) as e:
        if lenient:
            return None
        raise CheckpointError(f"{loc} is unreadable ({e}): if no run is using this storage, delete "
                              "it, or take the lease with acquire(force=True)") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: the host name alone
        return ""


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
