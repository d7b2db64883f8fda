"""One writer at a time per index root: a lease file with a time to live, and compare-and-set of CURRENT.

Layout: ``<index root>/LEASE`` (beside CURRENT), JSON::

    {"owner": "jobs.build_index", "host": "node-3", "pid": 4242, "token": "<uuid4 hex>",
     "acquired_at": "...+00:00", "renewed_at": "...+00:00", "expires_at": "...+00:00", "ttl_s": 120.0,
     "node": "<boot id>/pid:[<pid namespace>]", "process_start": "<clock ticks>"}

Rules:

- **Exclusive acquisition.** The lease file is created only when absent: on local disk by a hard link of a
  fully written temporary file (atomic and exclusive like ``O_CREAT | O_EXCL``, and the content appears whole;
  ``O_CREAT | O_EXCL`` itself where the filesystem has no hard links); on S3 by a conditional PUT
  (``If-None-Match: *``); on ``memory://`` by a process-local registry (that storage is process-local anyway).
  Any other storage raises :class:`LeaseUnsupportedError`: no lease is pretended.
- **Renewal.** While held, a background thread rewrites the lease every ``ttl_s / 3`` with a later expiry, only
  if the file is still this holder's (S3: ``If-Match: <ETag>``; local disk: same token, then an atomic replace).
  A lease found taken over, or not renewed before it expired, marks the holder *lost*: :meth:`WriterLease.check`
  then raises :class:`LeaseLostError`, and :func:`compare_and_publish` refuses to move CURRENT.
- **Breaking.** A lease is broken only once expired (a killed writer's lease expires by its TTL; clocks of the
  writers' hosts are assumed to agree to well within the TTL), or at once when its holder ran on this machine (same
  boot id and pid namespace, Linux) and that process is gone (a rerun right after a kill does not wait the TTL). Breaking is race-free: on S3 the expired lease is
  overwritten with ``If-Match: <its ETag>`` (one breaker wins); on local disk it is first renamed to a unique
  name (one breaker wins the rename), checked to be the expired one, then the new lease is created exclusively.
- **Waiting.** A second writer polls until the lease is free or ``timeout_s`` passes (0: fail at once), then
  raises :class:`LeaseHeldError` with one line naming the holder (owner, host, pid, expiry).
- **Release.** On leaving :func:`writer_lease` (success or exception) the lease file is deleted if still ours.

Use (a job that writes under the root: a build, a rollback, a pin, a prune)::

    from pipelines.index_lease import compare_and_publish, read_current, writer_lease

    with writer_lease(root, owner="jobs.versions rollback", timeout_s=600) as lease:
        started_from = read_current(root)             # None when the root has no CURRENT yet
        ...                                           # write files; lease.check() before anything irreversible
        if not compare_and_publish(root, started_from, version_id, lease=lease):
            ...                                       # CURRENT moved meanwhile: leave it, report superseded

The lease serializes writers that take it; :func:`compare_and_publish` also guards CURRENT against a writer whose
lease was lost (paused past its TTL) or that did not take the lease.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from pipelines import index_store, storage

LEASE_FILE = "LEASE"
DEFAULT_TTL_S = 120.0
DEFAULT_TIMEOUT_S = 600.0


class LeaseError(index_store.IndexValidationError):
    """The writer lease could not be taken or kept (an IndexValidationError, so jobs end with its one line)."""


class LeaseHeldError(LeaseError, TimeoutError):
    """Another writer holds the lease and did not release it within the timeout."""


class LeaseLostError(LeaseError):
    """This writer's lease expired or was taken over; it must not publish."""


class LeaseUnsupportedError(LeaseError):
    """The storage offers no atomic exclusive create, so no lease can be taken safely."""


def _now() -> float:
    return time.time()


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="milliseconds")


def _epoch(value: str) -> float:
    return datetime.datetime.fromisoformat(value).timestamp()


def _node() -> str:
    """This machine's boot id and this process's pid namespace (Linux), "" where unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The start time (clock ticks since boot) of a running process on this machine; None when there is no such
    process or it is a zombie (killed, not yet reaped)."""
    try:
        with open(f"/proc/{int(pid)}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    return None if fields[0] in ("Z", "X", "x") else fields[19]


@dataclass
class LeaseInfo:
    """What a lease file holds."""

    owner: str
    host: str
    pid: int
    token: str
    acquired_at: str
    renewed_at: str
    expires_at: str
    ttl_s: float
    node: str = ""  # Linux: boot id and pid namespace of the holder ("" elsewhere): where ``pid`` means something
    process_start: str = ""  # Linux: the holder's start time in clock ticks since boot (tells a reused pid)

    @classmethod
    def new(cls, owner: str, ttl_s: float) -> LeaseInfo:
        now = _now()
        return cls(owner=owner, host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex,
                   acquired_at=_iso(now), renewed_at=_iso(now), expires_at=_iso(now + ttl_s), ttl_s=float(ttl_s),
                   node=_node(), process_start=_process_start(os.getpid()) or "")

    @classmethod
    def parse(cls, data: bytes) -> LeaseInfo | None:
        """None for a damaged file (it is then treated as held until its modification time plus the default TTL)."""
        try:
            value = json.loads(data)
            info = cls(**{key: value[key] for key in cls.__dataclass_fields__ if key in value or key not in ("node", "process_start")})
            _epoch(info.expires_at)
            return info
        except (ValueError, TypeError, KeyError):
            return None

    def renewed(self) -> LeaseInfo:
        now = _now()
        return LeaseInfo(**{**asdict(self), "renewed_at": _iso(now), "expires_at": _iso(now + self.ttl_s)})

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @property
    def expires_epoch(self) -> float:
        return _epoch(self.expires_at)

    def expired(self) -> bool:
        return _now() >= self.expires_epoch

    def holder_gone(self) -> bool:
        """True when the holder ran on this machine (same boot, same pid namespace) and its process no longer
        exists (or its pid now names another process): its lease can be broken before it expires. False when
        unknown (another machine, another container, no /proc): the lease then waits for its expiry."""
        if not self.node or self.node != _node() or self.host != socket.gethostname() or not self.process_start:
            return False
        return _process_start(self.pid) != self.process_start

    def describe(self) -> str:
        left = self.expires_epoch - _now()
        when = f"in {left:.0f} s" if left >= 0 else f"{-left:.0f} s ago"
        return f"owner {self.owner!r} on host {self.host}, pid {self.pid}, lease expires {self.expires_at} ({when})"


# ---------------------------------------------------------------------------------------------------
# Backends: create (exclusive), read (content and a tag that changes with the holder), replace and delete
# only while the tag is unchanged, and take over an expired lease.


class _LocalBackend:
    """A file on local disk; the tag is the holder's token (a damaged file: its inode and mtime)."""

    def __init__(self, path: str):
        self.path = path
        self.made_folder = False  # the lease created the root's folder: removed with the lease if still empty

    def _tag(self, data: bytes, stat: os.stat_result) -> str:
        info = LeaseInfo.parse(data)
        return info.token if info else f"damaged-{stat.st_ino}-{stat.st_mtime_ns}"

    def _read_path(self, path: str) -> tuple[bytes, str, float] | None:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
                stat = os.fstat(handle.fileno())
        except FileNotFoundError:
            return None
        return data, self._tag(data, stat), stat.st_mtime

    def read(self) -> tuple[bytes, str, float] | None:
        return self._read_path(self.path)

    def _temporary(self, data: bytes) -> str:
        temporary = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return temporary

    def create(self, data: bytes, token: str) -> str | None:
        folder = os.path.dirname(self.path) or "."
        for attempt in range(3):  # the folder may be removed by a holder releasing it (see delete) between these calls
            made = not os.path.isdir(folder)
            os.makedirs(folder, exist_ok=True)
            try:
                temporary = self._temporary(data)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        self.made_folder = made
        try:
            os.link(temporary, self.path)  # atomic, fails when the name exists; the content is already whole
        except FileExistsError:
            return None
        except OSError:  # no hard links here (some network / FUSE filesystems): exclusive create
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        return token

    def replace(self, data: bytes, tag: str, token: str) -> str | None:
        current = self.read()
        if current is None or current[1] != tag:
            return None
        os.replace(self._temporary(data), self.path)
        return token

    def _take_aside(self, tag: str) -> str | None:
        """Rename the lease to a unique name (only one process wins this rename); the new name if it held
        ``tag``, else None, with a live lease moved by mistake put back (a hard link never overwrites)."""
        aside = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        moved = self._read_path(aside)
        if moved is not None and moved[1] == tag:
            return aside
        with contextlib.suppress(OSError):
            os.link(aside, self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)
        return None

    def take_over(self, stale_tag: str, data: bytes, token: str) -> str | None:
        aside = self._take_aside(stale_tag)
        if aside is None:
            return None
        os.unlink(aside)
        return self.create(data, token)

    def delete(self, tag: str) -> bool:
        aside = self._take_aside(tag)
        if aside is None:
            return False
        os.unlink(aside)
        if self.made_folder:  # a job that failed before writing anything leaves no empty index folder behind
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.path))
        return True


class _S3Backend:
    """An S3 object; conditional PUT / DELETE (``If-None-Match: *``, ``If-Match: <ETag>``); the tag is the ETag."""

    def __init__(self, filesystem, path: str):
        self.filesystem = filesystem
        self.bucket, self.key, _ = filesystem.split_path(path)

    @staticmethod
    def _precondition_failed(error: BaseException) -> bool:
        cause = error if hasattr(error, "response") else error.__cause__
        response = getattr(cause, "response", None) or {}
        return response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            return self.filesystem.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except Exception as error:
            if isinstance(error, FileExistsError) or self._precondition_failed(error):
                return None
            if "NotImplemented" in str(error) or "not implemented" in str(error).lower():
                raise LeaseUnsupportedError(f"s3://{self.bucket}/{self.key}: this S3 endpoint has no conditional writes "
                                            f"(If-None-Match / If-Match), so no writer lease can be taken safely ({error})") from None
            raise

    def read(self) -> tuple[bytes, str, float] | None:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str, float]:
            response = await self.filesystem._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as body:
                data = await body.read()
            return data, response["ETag"], response["LastModified"].timestamp()

        try:
            return sync(self.filesystem.loop, get)
        except FileNotFoundError:
            return None

    def create(self, data: bytes, token: str) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, tag: str, token: str) -> str | None:
        return self._put(data, IfMatch=tag)

    def take_over(self, stale_tag: str, data: bytes, token: str) -> str | None:
        return self._put(data, IfMatch=stale_tag)

    def delete(self, tag: str) -> bool:
        try:
            self.filesystem.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=tag)
            return True
        except FileNotFoundError:
            return False
        except Exception as error:  # noqa: BLE001
            if self._precondition_failed(error):
                return False
            # An endpoint without conditional DELETE: delete if the ETag is still ours (a small window), else leave it.
            current = self.read()
            if current is None or current[1] != tag:
                return False
            self.filesystem.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
            return True


_MEMORY_LEASES: dict[str, tuple[bytes, str]] = {}
_MEMORY_LOCK = threading.Lock()


class _MemoryBackend:
    """Process-local storage (memory://): a registry in this process, under a lock; the tag counts writes."""

    def __init__(self, key: str):
        self.key = key

    def read(self) -> tuple[bytes, str, float] | None:
        with _MEMORY_LOCK:
            entry = _MEMORY_LEASES.get(self.key)
        return (entry[0], entry[1], _now()) if entry else None

    def _set_if(self, expected: str | None, data: bytes) -> str | None:
        with _MEMORY_LOCK:
            entry = _MEMORY_LEASES.get(self.key)
            if (entry[1] if entry else None) != expected:
                return None
            tag = uuid.uuid4().hex
            _MEMORY_LEASES[self.key] = (data, tag)
            return tag

    def create(self, data: bytes, token: str) -> str | None:
        return self._set_if(None, data)

    def replace(self, data: bytes, tag: str, token: str) -> str | None:
        return self._set_if(tag, data)

    def take_over(self, stale_tag: str, data: bytes, token: str) -> str | None:
        return self._set_if(stale_tag, data)

    def delete(self, tag: str) -> bool:
        with _MEMORY_LOCK:
            entry = _MEMORY_LEASES.get(self.key)
            if not entry or entry[1] != tag:
                return False
            del _MEMORY_LEASES[self.key]
            return True


def lease_url(root: str) -> str:
    return storage.join_url(root, LEASE_FILE)


def _backend(root: str):
    filesystem, path = storage.filesystem_and_path(lease_url(root))
    protocols = filesystem.protocol if isinstance(filesystem.protocol, (tuple, list)) else (filesystem.protocol,)
    if storage.is_local(filesystem):
        return _LocalBackend(path)
    if "memory" in protocols:
        return _MemoryBackend(storage.to_url(filesystem, path))
    if "s3" in protocols or "s3a" in protocols:
        return _S3Backend(filesystem, path)
    raise LeaseUnsupportedError(f"{root}: no writer lease on {'/'.join(protocols)} storage (no atomic exclusive create is known "
                                f"here; supported: local disk, s3://, memory://)")


def _holder(entry: tuple[bytes, str, float]) -> LeaseInfo:
    """The lease in a file; a damaged file stands for an unknown holder until its modification time + the default TTL."""
    info = LeaseInfo.parse(entry[0])
    if info is not None:
        return info
    return LeaseInfo(owner="unknown (damaged lease file)", host="?", pid=0, token=entry[1], acquired_at=_iso(entry[2]),
                     renewed_at=_iso(entry[2]), expires_at=_iso(entry[2] + DEFAULT_TTL_S), ttl_s=DEFAULT_TTL_S)


def read_lease(root: str) -> LeaseInfo | None:
    """The lease on ``root`` now (expired or not), or None when there is none."""
    entry = _backend(root).read()
    return _holder(entry) if entry else None


class WriterLease:
    """A held lease; renewed by a background thread while held (see the module docstring)."""

    def __init__(self, root: str, backend, info: LeaseInfo, tag: str):
        self.root = root
        self.info = info
        self._backend = backend
        self._tag = tag
        self._lock = threading.Lock()
        self._lost: str = ""
        self._released = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return not self._lost and not self._released and not self.info.expired()

    def check(self) -> None:
        """LeaseLostError unless the lease is still ours and unexpired (call it before anything irreversible)."""
        if self._released:
            raise LeaseLostError(f"{self.root}: the writer lease was already released")
        if not self._lost and self.info.expired():
            self._lost = f"it expired at {self.info.expires_at} without being renewed"
        if self._lost:
            raise LeaseLostError(f"{self.root}: this writer's lease was lost ({self._lost}); nothing was published")

    def renew(self) -> None:
        """Push the expiry ``ttl_s`` ahead, if the lease is still ours; LeaseLostError otherwise."""
        with self._lock:
            self.check()
            info = self.info.renewed()
            tag = self._backend.replace(info.to_bytes(), self._tag, info.token)
            if tag is None:
                current = self._backend.read()
                holder = f"now held by {_holder(current).describe()}" if current else "the lease file is gone"
                self._lost = f"taken over after expiry: {holder}"
                self.check()
            self.info, self._tag = info, tag

    def _renew_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LeaseLostError:
                return
            except Exception as error:  # noqa: BLE001 - a transient storage error: retry at the next tick
                print(f"warning: could not renew the writer lease on {self.root} ({error}); retrying", flush=True)

    def start_renewing(self, interval: float | None = None) -> None:
        interval = interval if interval is not None else self.info.ttl_s / 3
        self._thread = threading.Thread(target=self._renew_loop, args=(interval,), name=f"lease-renewal {self.root}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease file if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._released:
                return
            self._released = True
            if not self._lost:
                self._backend.delete(self._tag)


def acquire(root: str, owner: str = "", timeout_s: float = DEFAULT_TIMEOUT_S, ttl_s: float = DEFAULT_TTL_S,
            poll_s: float | None = None) -> WriterLease:
    """Take the writer lease on ``root`` (not yet renewing: see :func:`writer_lease`), waiting up to ``timeout_s``
    for another holder to release it or let it expire; LeaseHeldError naming the holder after that."""
    if ttl_s <= 0:
        raise ValueError(f"lease TTL {ttl_s}: must be positive")
    backend = _backend(root)
    owner = owner or f"pid {os.getpid()}"
    poll_s = poll_s if poll_s is not None else min(5.0, max(0.05, ttl_s / 20))
    deadline = time.monotonic() + max(0.0, timeout_s)
    announced = False
    while True:
        info = LeaseInfo.new(owner, ttl_s)
        entry = backend.read()
        if entry is None:
            tag = backend.create(info.to_bytes(), info.token)
        else:
            holder = _holder(entry)
            tag = None
            gone = not holder.expired() and holder.holder_gone()
            if gone or holder.expired():
                tag = backend.take_over(entry[1], info.to_bytes(), info.token)
                if tag is not None:
                    why = "of a process that no longer runs" if gone else "expired"
                    print(f"broke the writer lease on {root} {why} ({holder.describe()})", flush=True)
        if tag is not None:
            # The expiry counts from when the lease was written, not from before the wait.
            return WriterLease(root, backend, info, tag)
        current = backend.read()
        if current is None:
            continue  # released between our read and our create: try again at once
        holder = _holder(current)
        left = deadline - time.monotonic()
        if left <= 0:
            waited = f"waited {timeout_s:g} s" if timeout_s > 0 else "not waiting (lock timeout 0)"
            raise LeaseHeldError(f"{root}: another writer holds the index's lease: {holder.describe()}; {waited}")
        if not announced:
            print(f"waiting up to {left:.0f} s for the writer lease on {root}: {holder.describe()}", flush=True)
            announced = True
        time.sleep(min(poll_s, left, max(0.0, holder.expires_epoch - _now()) + 0.01))


@contextlib.contextmanager
def writer_lease(root: str, owner: str = "", timeout_s: float = DEFAULT_TIMEOUT_S, ttl_s: float = DEFAULT_TTL_S,
                 poll_s: float | None = None, renew_every_s: float | None = None) -> Iterator[WriterLease]:
    """Hold the writer lease on ``root`` for the block: acquired (waiting up to ``timeout_s``), renewed every
    ``renew_every_s`` (default ``ttl_s / 3``) in the background, released on exit whatever happens."""
    lease = acquire(root, owner=owner, timeout_s=timeout_s, ttl_s=ttl_s, poll_s=poll_s)
    try:
        lease.start_renewing(renew_every_s)
        yield lease
    finally:
        lease.release()


@contextlib.contextmanager
def lease_if_supported(root: str, owner: str = "", timeout_s: float = DEFAULT_TIMEOUT_S, warning: str = "") -> Iterator[WriterLease | None]:
    """:func:`writer_lease`, or None where the storage offers no atomic create (then ``warning``, when given, is
    printed after the reason): writers on such storage run as they did before leases existed."""
    try:
        lease = acquire(root, owner=owner, timeout_s=timeout_s)
    except LeaseUnsupportedError as error:
        if warning:
            print(f"warning: {error}; {warning}", flush=True)
        yield None
        return
    try:
        lease.start_renewing()
        yield lease
    finally:
        lease.release()


def read_current(root: str) -> str | None:
    """The version id CURRENT names, or None when the root has no CURRENT yet."""
    if not storage.exists(storage.join_url(root, "CURRENT")):
        return None
    return index_store.current_version_id(root)


def compare_and_publish(root: str, expected_current: str | None, version_id: str, lease: WriterLease | None = None) -> bool:
    """Point CURRENT at the finished ``version_id`` only if it still names ``expected_current`` (None: no CURRENT
    yet) or already names ``version_id``; False, CURRENT untouched, when it has moved to another version.

    Call it holding the writer lease on ``root`` (pass it as ``lease`` to check it is still held: LeaseLostError
    otherwise), so no other lease holder moves CURRENT between the comparison and the write.
    """
    if lease is not None:
        lease.check()
    current = read_current(root)
    if current == version_id:
        return True
    if current != expected_current:
        return False
    if lease is not None:
        lease.check()
    index_store.publish(root, version_id)
    return True

