"""Index versions as a managed lifecycle: list, show, roll back, pin, and prune what no version needs.

Works on any fsspec index root (local, ``s3://``, ``memory://``). Beside the layout of
:mod:`pipelines.index_store` it keeps, under the root::

    history/<UTC time>-<version id>.json   one entry each time CURRENT moves (append-only): version, previous,
                                           time, reason (build, rollback), who; written when CURRENT has moved
    pins/<version id>.json                 a pinned version (never pruned): who pinned it, when, a note

What a version references (read from its manifest, see :func:`referenced_files`): files in its own folder
(shards, ``doc_ids.parquet``, ``bm25-statistics.npz``, ``rescoring.faiss``, ``trained.faiss``), and files
shared by versions under the root: ``vectors/`` (re-scoring vectors), ``sparse/`` (BM25 shards),
``documents/`` (document store files and their ``.json`` records), ``models/<name>/`` (the int8 bi-encoder,
``model.quantized_model``) and ``embeddings/<model key>/`` (``model.key``: the embedding store of a model,
one folder per model and settings, shared by every version built with that model; its parts mix rows of
every corpus ever embedded, so it is removed only whole, when no remaining version uses that model).

Pruning rules (:func:`plan_prune`), all of them, whatever ``--keep`` says:

- CURRENT, pinned versions and the ``keep`` newest finished versions (by ``created_at``) stay;
- a version that stopped being current less than ``grace`` ago stays, so that a reader that started on it
  can finish (when it stopped comes from ``history/``; without a consistent history, from the time
  CURRENT was last written, which bounds it);
- with ``older_than``, only versions created longer ago than that are removed;
- unfinished version folders (no manifest) are removed only when their newest file is older than
  ``grace``: a running build keeps writing into its folder;
- a shared file or folder is removed only when no remaining finished version references it, its newest
  file is older than ``grace``, and no unfinished version folder is younger than ``grace`` (a running
  build may be about to reference a file it found in place). If any remaining version's manifest cannot be
  read, no shared file is removed.

A version folder is removed manifest first, so an interrupted prune leaves an unfinished folder (removed by
a later prune), never a damaged finished version.
"""

from __future__ import annotations

import datetime
import getpass
import json
import re
import socket
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines import index_store, storage
from pipelines.index_lease import read_current
from pipelines.index_store import IndexValidationError

HISTORY_FOLDER = "history"
PINS_FOLDER = "pins"
SHARED_FILE_FOLDERS = (index_store.VECTORS_FOLDER, index_store.SPARSE_FOLDER, index_store.DOCUMENTS_FOLDER)  # content-addressed files
SHARED_TREE_FOLDERS = ("embeddings", index_store.MODELS_FOLDER)  # one sub-folder per model (removed whole)
DEFAULT_GRACE = "1d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class VersionsError(IndexValidationError):
    """A versions command cannot do what was asked (unknown version, unfinished or damaged target...)."""


# --- small helpers ---------------------------------------------------------------------------------


def parse_duration(text: str) -> datetime.timedelta:
    """``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or a sum of them (``1d12h``); ``0`` is no time.

    Example:
        >>> parse_duration("1d12h")
        datetime.timedelta(days=1, seconds=43200)
    """
    value = str(text).strip().lower()
    if value in ("0", "0s"):
        return datetime.timedelta(0)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", value)
    if not parts or "".join(number + unit for number, unit in parts) != value.replace(" ", ""):
        raise ValueError(f"duration {text!r}: use a number and a unit, s m h d or w (e.g. 7d, 12h, 30m, 1d12h)")
    return datetime.timedelta(seconds=sum(float(number) * _UNITS[unit] for number, unit in parts))


def format_duration(seconds: float | None) -> str:
    """A short human duration: ``3d 4h``, ``2h 5m``, ``40s`` ("-" when unknown)."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {seconds}s"
    return f"{seconds}s"


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _timestamp(value: Any) -> float | None:
    """Seconds since the epoch of a time as fsspec implementations report it (float, datetime, ISO string)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=datetime.UTC)).timestamp()
    try:
        parsed = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)).timestamp()


def modified_time(info: dict[str, Any]) -> float | None:
    """When a file was last written, from its fsspec info (local mtime, S3 LastModified, memory created, GCS updated)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created", "ctime"):
        found = _timestamp(info.get(key))
        if found is not None:
            return found
    return None


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat()


def _parse_iso(text: Any) -> datetime.datetime | None:
    seconds = _timestamp(text)
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC) if seconds is not None else None


@dataclass
class StoredFile:
    path: str  # relative to the index root
    bytes: int
    modified: float | None  # seconds since the epoch; None when the storage does not say


def tree_files(root: str, relative: str) -> list[StoredFile]:
    """Every file under ``root/relative`` (recursively), with size and modification time; empty if it does not exist."""
    filesystem, base = storage.filesystem_and_path(root)
    _, folder = storage.filesystem_and_path(storage.join_url(root, relative))
    if not filesystem.exists(folder):
        return []
    base = base.rstrip("/")
    found = []
    for name, info in sorted(filesystem.find(folder, detail=True).items()):
        if info.get("type", "file") != "file":
            continue
        name = str(name)
        path = name[len(base):].lstrip("/") if name.startswith(base) else name.rsplit(base + "/", 1)[-1]
        found.append(StoredFile(path=path, bytes=int(info.get("size") or 0), modified=modified_time(info)))
    return found


def _subfolders(root: str, relative: str) -> list[str]:
    """Names of the folders directly under ``root/relative``."""
    filesystem, folder = storage.filesystem_and_path(storage.join_url(root, relative))
    if not filesystem.exists(folder):
        return []
    return sorted(str(entry["name"]).rstrip("/").rsplit("/", 1)[-1] for entry in filesystem.ls(folder, detail=True) if entry.get("type") == "directory")


# --- what a version references ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """A file a manifest names: its path relative to the root, and its checksum and size when the manifest has them."""

    path: str
    sha256: str | None
    bytes: int | None
    shared: bool  # under the root's shared folders (vectors/, sparse/, documents/), not in the version folder


_NOT_FILES = ("corpus", "documents", "code_version", "quarantine", "embeddings")  # corpus URLs and settings, not index files


def referenced_files(manifest: dict[str, Any]) -> list[Reference]:
    """Every file a version's manifest names, with checksum and size where recorded.

    Found generically: any ``file`` / ``<name>_file`` string in the manifest (its ``<name>_sha256`` /
    ``sha256`` and ``<name>_bytes`` / ``bytes`` beside it): shards, their re-scoring vectors and quantizer,
    ``doc_ids``, BM25 statistics and shards, document store files, the trained index. A name with a '/'
    is relative to the root (``vectors/``, ``sparse/``, ``documents/``), a plain name to the version folder.
    A document store file's ``.json`` record is referenced with it.
    """
    version_folder = f"versions/{manifest['version_id']}"
    found: dict[str, Reference] = {}

    def add(name: str, sha: Any, size: Any) -> None:
        shared = "/" in name
        path = name if shared else f"{version_folder}/{name}"
        found.setdefault(path, Reference(path, sha if isinstance(sha, str) and sha else None, int(size) if isinstance(size, (int, float)) else None, shared))

    def walk(value: Any, top: bool) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item, False)
            return
        if not isinstance(value, dict):
            return
        for key, item in value.items():
            if top and key in _NOT_FILES:
                continue
            if isinstance(item, str) and (key == "file" or key.endswith("_file")):
                prefix = "" if key == "file" else key[: -len("file")]
                add(item, value.get(f"{prefix}sha256"), value.get(f"{prefix}bytes"))
            elif isinstance(item, (dict, list)):
                walk(item, False)

    walk(manifest, True)
    for reference in list(found.values()):
        if reference.path.startswith(f"{index_store.DOCUMENTS_FOLDER}/") and reference.path.endswith(".arrow"):
            record = reference.path[: -len(".arrow")] + ".json"
            found.setdefault(record, Reference(record, None, None, True))
    return sorted(found.values(), key=lambda reference: reference.path)


def referenced_trees(manifest: dict[str, Any]) -> tuple[set[str], bool]:
    """The shared folders (``embeddings/<key>``, ``models/<name>``) a version uses, and whether that set is known.

    The embedding store is ``model.key`` (or the last part of ``embeddings.url``); a version with neither
    (built outside the job) makes the set unknown, and then no embedding store is removed.
    """
    trees = set()
    known = True
    model = manifest.get("model") or {}
    quantized = model.get("quantized_model")
    if quantized:
        trees.add(str(quantized).strip("/"))
    key = model.get("key")
    if not key:
        url = str((manifest.get("embeddings") or {}).get("url") or "").rstrip("/")
        folder, _, name = url.rpartition("/")
        key = name if folder.endswith("/embeddings") or folder == "embeddings" else ""
    if key:
        trees.add(f"embeddings/{key}")
    else:
        known = False
    return trees, known


def version_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of the files the version references, as its manifest records them (shared files included)."""
    return sum(reference.bytes or 0 for reference in referenced_files(manifest))


# --- history and pins ------------------------------------------------------------------------------


def read_history(root: str) -> list[dict[str, Any]]:
    """Every recorded move of CURRENT, oldest first (entries that cannot be read are skipped)."""
    entries = []
    for url in storage.list_files(storage.join_url(root, HISTORY_FOLDER), ".json"):
        try:
            entry = storage.read_json(url)
        except (ValueError, OSError):
            continue
        moment = _parse_iso(entry.get("published_at")) if isinstance(entry, dict) else None
        if moment is not None and isinstance(entry.get("version_id"), str):
            entries.append({**entry, "_time": moment, "_name": url.rsplit("/", 1)[-1]})
    entries.sort(key=lambda entry: (entry["_time"], entry["_name"]))
    return entries


def record_publish(root: str, version_id: str, previous: str | None, reason: str = "build", now: datetime.datetime | None = None) -> bool:
    """Append a ``history/`` entry: CURRENT moved from ``previous`` to ``version_id`` (nothing when they are equal).

    Called right after CURRENT moved. A crash between the move and the entry leaves a history whose last
    entry does not name CURRENT, which :func:`superseded_times` treats as an unrecorded move (the safe side).
    """
    if previous == version_id:
        return False
    moment = now or utc_now()
    entry = {"version_id": version_id, "previous": previous, "published_at": _iso(moment), "reason": reason, "by": _who()}
    name = f"{moment.astimezone(datetime.UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{version_id}-{uuid.uuid4().hex[:6]}.json"
    storage.write_json_atomically(storage.join_url(root, HISTORY_FOLDER, name), entry)
    return True


def writer_lease(root: str, owner: str, timeout_s: float = 600.0):
    """The root's writer lease (``pipelines.index_lease``) for a block that writes under it; None (no lease) where
    the storage has no lease support, so the commands run on any fsspec root."""
    from pipelines import index_lease

    return index_lease.lease_if_supported(root, owner=owner, timeout_s=timeout_s)


def publish(root: str, version_id: str, reason: str = "build", now: datetime.datetime | None = None, lease: Any = None) -> bool:
    """Point CURRENT at a finished version and record the move in ``history/``; returns whether CURRENT moved.

    With a writer lease (``pipelines.index_lease``) CURRENT moves by compare-and-set against the CURRENT read
    here; without one, by ``index_store.publish``. Nothing is recorded when CURRENT already names the version.
    """
    if not storage.exists(storage.join_url(index_store.version_url(root, version_id), "manifest.json")):
        raise VersionsError(f"{index_store.version_url(root, version_id)}: no manifest.json; the version is unfinished")
    previous = read_current(root)
    if lease is not None:
        from pipelines import index_lease

        if not index_lease.compare_and_publish(root, previous, version_id, lease=lease):
            raise VersionsError(f"{root}: CURRENT moved while publishing {version_id}; run the command again")
    else:
        index_store.publish(root, version_id)
    return record_publish(root, version_id, previous, reason, now)


def _pin_url(root: str, version_id: str) -> str:
    return storage.join_url(root, PINS_FOLDER, f"{index_store.plain_name(version_id, 'version id', root)}.json")


def read_pins(root: str) -> dict[str, dict[str, Any]]:
    """Pinned version id -> its pin record (who, when, note)."""
    pins = {}
    for url in storage.list_files(storage.join_url(root, PINS_FOLDER), ".json"):
        version_id = url.rsplit("/", 1)[-1][: -len(".json")]
        try:
            pins[version_id] = storage.read_json(url)
        except (ValueError, OSError):
            pins[version_id] = {"version_id": version_id}  # a damaged record still pins
    return pins


def pin(root: str, version_id: str, note: str = "", now: datetime.datetime | None = None) -> dict[str, Any]:
    """Pin a finished version (never pruned); returns the pin record."""
    index_store.read_manifest(root, version_id)  # finished, with a readable manifest
    record = {"version_id": version_id, "pinned_at": _iso(now or utc_now()), "pinned_by": _who(), "note": note}
    storage.write_json_atomically(_pin_url(root, version_id), record)
    return record


def unpin(root: str, version_id: str) -> bool:
    """Remove a version's pin; returns whether it was pinned."""
    url = _pin_url(root, version_id)
    if not storage.exists(url):
        return False
    filesystem, path = storage.filesystem_and_path(url)
    filesystem.rm(path)
    return True


# --- listing ---------------------------------------------------------------------------------------


@dataclass
class VersionInfo:
    version_id: str
    finished: bool
    created_at: str = ""
    documents: int | None = None
    quarantined: int | None = None
    factory: str = ""
    shards: int | None = None
    sparse: bool = False
    bytes: int | None = None
    model: str = ""
    current: bool = False
    pinned: bool = False
    error: str = ""  # the manifest could not be read
    files: int = 0  # unfinished: files in the folder
    folder_bytes: int = 0  # unfinished: their bytes
    newest_file_at: float | None = None  # unfinished: when its newest file was written
    age_seconds: float | None = None  # unfinished: since its newest file was written
    manifest: dict[str, Any] | None = field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("manifest")
        return values


def _describe(manifest: dict[str, Any], info: VersionInfo) -> None:
    counts = manifest.get("counts") or {}
    model = manifest.get("model") or {}
    info.created_at = str(manifest.get("created_at", ""))
    info.documents = counts.get("indexed")
    info.quarantined = counts.get("quarantined")
    info.factory = str((manifest.get("index") or {}).get("factory", ""))
    info.shards = len(manifest.get("shards") or [])
    info.sparse = bool(manifest.get("sparse"))
    info.bytes = version_bytes(manifest)
    name = str(model.get("model", ""))
    info.model = (name.rstrip("/").rsplit("/", 1)[-1] if "/" in name else name) + (" int8" if model.get("quantized_model") else "")


def scan_versions(root: str, now: datetime.datetime | None = None) -> tuple[list[VersionInfo], list[VersionInfo]]:
    """(finished versions oldest first, unfinished version folders oldest first) under the root."""
    now_seconds = (now or utc_now()).timestamp()
    current = read_current(root)
    pins = read_pins(root)
    finished, unfinished = [], []
    for version_id in _subfolders(root, "versions"):
        info = VersionInfo(version_id=version_id, finished=False, current=version_id == current, pinned=version_id in pins)
        manifest_url = storage.join_url(index_store.versions_url(root), version_id, "manifest.json")
        if storage.exists(manifest_url):
            info.finished = True
            try:
                info.manifest = index_store.Manifest.check(storage.read_json(manifest_url), version_id, manifest_url)
                _describe(info.manifest, info)
            except (IndexValidationError, ValueError, KeyError, TypeError, OSError) as error:
                info.error = str(error).splitlines()[0] if str(error) else type(error).__name__
            finished.append(info)
        else:
            files = tree_files(root, f"versions/{version_id}")
            info.files = len(files)
            info.folder_bytes = sum(item.bytes for item in files)
            times = [item.modified for item in files if item.modified is not None]
            info.newest_file_at = max(times) if times else None
            info.age_seconds = now_seconds - info.newest_file_at if info.newest_file_at is not None else None
            unfinished.append(info)
    finished.sort(key=lambda info: (info.created_at, info.version_id))
    unfinished.sort(key=lambda info: -(info.age_seconds or 0))
    return finished, unfinished


def version_summary(root: str, version_id: str | None = None) -> dict[str, Any]:
    """One version (CURRENT by default): its row, manifest, summary.json, pin record and history entries."""
    version_id = version_id or index_store.current_version_id(root)
    manifest = index_store.read_manifest(root, version_id)
    info = VersionInfo(version_id=version_id, finished=True, current=version_id == read_current(root))
    _describe(manifest, info)
    pins = read_pins(root)
    info.pinned = version_id in pins
    summary_url = storage.join_url(index_store.version_url(root, version_id), "summary.json")
    summary = storage.read_json(summary_url) if storage.exists(summary_url) else None
    history = [{key: value for key, value in entry.items() if not key.startswith("_")} for entry in read_history(root) if entry["version_id"] == version_id]
    return {"version": info.row(), "pin": pins.get(version_id), "history": history, "summary": summary, "manifest": manifest}


# --- validation and rollback -----------------------------------------------------------------------


def validate_version(root: str, version_id: str) -> dict[str, Any]:
    """The manifest of a finished version whose every referenced file exists and matches its checksum.

    Checks the manifest (keys, format, id, confined paths), then every file it names (shards, re-scoring
    vectors and quantizer, doc ids, BM25 statistics and shards, document store files: each streamed through
    sha256; files without a recorded checksum, like ``trained.faiss``, must exist), and the int8 model folder.
    Raises :class:`IndexValidationError` with one line naming the first problem.
    """
    manifest = index_store.read_manifest(root, version_id)
    for reference in referenced_files(manifest):
        url = storage.join_url(root, reference.path)
        if not storage.exists(url):
            raise VersionsError(f"version {version_id}: {url} is listed in the manifest but missing")
        if reference.sha256:
            actual = index_store.file_sha256(url)
            if actual != reference.sha256:
                raise VersionsError(f"version {version_id}: {url} is damaged (checksum {actual[:12]}…, manifest {reference.sha256[:12]}…)")
    quantized = (manifest.get("model") or {}).get("quantized_model")
    if quantized:
        from pipelines import quantization

        url = index_store.quantized_model_url(root, manifest)
        if not quantization.is_complete(url):
            raise VersionsError(f"version {version_id}: its int8 model {url} is missing or incomplete")
    return manifest


def rollback(root: str, version_id: str, now: datetime.datetime | None = None, lease: Any = None) -> dict[str, Any]:
    """Validate a version and point CURRENT at it (recorded in history); returns what happened."""
    manifest = validate_version(root, version_id)
    previous = read_current(root)
    moved = publish(root, version_id, reason="rollback", now=now, lease=lease)
    return {"version_id": version_id, "previous": previous, "moved": moved, "created_at": manifest.get("created_at")}


# --- pruning ---------------------------------------------------------------------------------------


def superseded_times(root: str, versions: list[str], current: str | None) -> dict[str, float | None]:
    """For each non-current version, the latest time it can have stopped being current (None: it is current).

    From ``history/`` when it is consistent (its last entry names CURRENT): the start of the entry that
    followed the version's last period; a version with no entry stopped (if it ever was current) when the
    first recorded move happened. Otherwise (no history, or CURRENT moved without an entry) the time
    CURRENT was last written bounds every other version, and is used where it is later.
    """
    history = read_history(root)
    filesystem, path = storage.filesystem_and_path(storage.join_url(root, "CURRENT"))
    pointer_time = None
    if filesystem.exists(path):
        pointer_time = modified_time(filesystem.info(path))
    consistent = bool(history) and history[-1]["version_id"] == current
    ends: dict[str, float | None] = {}
    for number, entry in enumerate(history):
        end = history[number + 1]["_time"].timestamp() if number + 1 < len(history) else None
        version_id = entry["version_id"]
        if end is None:
            ends[version_id] = None  # still current according to the history
        elif ends.get(version_id, 0.0) is not None:
            ends[version_id] = max(ends.get(version_id) or 0.0, end)
    first = history[0]["_time"].timestamp() if history else None
    result: dict[str, float | None] = {}
    unknown = pointer_time if pointer_time is not None else utc_now().timestamp()
    for version_id in versions:
        if version_id == current:
            result[version_id] = None
            continue
        recorded = ends.get(version_id, first)
        if consistent and recorded is not None:
            result[version_id] = recorded
        else:
            result[version_id] = max(value for value in (recorded, unknown) if value is not None)
    return result


@dataclass
class PrunePlan:
    root: str
    keep: int
    older_than: str | None
    grace: str
    dry_run: bool
    versions: list[dict[str, Any]] = field(default_factory=list)  # removed finished versions
    kept: list[dict[str, Any]] = field(default_factory=list)  # finished versions kept, with why
    unfinished: list[dict[str, Any]] = field(default_factory=list)  # removed unfinished folders
    unfinished_kept: list[dict[str, Any]] = field(default_factory=list)
    shared: list[dict[str, Any]] = field(default_factory=list)  # removed shared files and folders
    notes: list[str] = field(default_factory=list)
    removed: bool = False

    @property
    def bytes_freed(self) -> int:
        return sum(item["bytes"] for group in (self.versions, self.unfinished, self.shared) for item in group)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_freed": self.bytes_freed}


def plan_prune(root: str, keep: int, older_than: str | None = None, grace: str = DEFAULT_GRACE, now: datetime.datetime | None = None,
               dry_run: bool = False) -> PrunePlan:
    """What :func:`prune` removes (see the module docstring for the rules); removes nothing."""
    if keep < 1:
        raise VersionsError(f"--keep {keep}: keep at least 1 version (CURRENT is always kept besides)")
    now = now or utc_now()
    now_seconds = now.timestamp()
    grace_seconds = parse_duration(grace).total_seconds()
    older_seconds = parse_duration(older_than).total_seconds() if older_than else None
    plan = PrunePlan(root=root, keep=keep, older_than=older_than, grace=grace, dry_run=dry_run)
    finished, unfinished = scan_versions(root, now)
    current = read_current(root)
    pins = read_pins(root)
    ends = superseded_times(root, [info.version_id for info in finished], current)
    newest = {info.version_id for info in finished[-keep:]}
    remaining = []
    for info in finished:
        reasons = []
        if info.version_id == current:
            reasons.append("CURRENT")
        if info.version_id in pins:
            reasons.append("pinned")
        if info.version_id in newest:
            reasons.append(f"among the newest {keep}")
        end = ends.get(info.version_id)
        if info.version_id != current and end is not None and now_seconds - end < grace_seconds:
            reasons.append(f"current until {format_duration(now_seconds - end)} ago (grace {grace})")
        created = _parse_iso(info.created_at)
        if older_seconds is not None and (created is None or now_seconds - created.timestamp() < older_seconds):
            reasons.append(f"created less than {older_than} ago")
        if info.error:
            reasons.append(f"manifest unreadable: {info.error}")
        row = {"version_id": info.version_id, "created_at": info.created_at}
        if reasons:
            plan.kept.append({**row, "why": "; ".join(reasons)})
            remaining.append(info)
        else:
            files = tree_files(root, f"versions/{info.version_id}")
            plan.versions.append({**row, "path": f"versions/{info.version_id}", "files": len(files), "bytes": sum(item.bytes for item in files)})
    running = False
    for info in unfinished:
        row = {"version_id": info.version_id, "path": f"versions/{info.version_id}", "files": info.files, "bytes": info.folder_bytes,
               "age": format_duration(info.age_seconds)}
        if info.age_seconds is not None and info.age_seconds >= grace_seconds:
            plan.unfinished.append(row)
        else:
            running = True
            plan.unfinished_kept.append({**row, "why": f"written to less than {grace} ago (a build may be running)" if info.age_seconds is not None
                                         else "age unknown"})
    _plan_shared(root, plan, remaining, running, now_seconds, grace_seconds)
    return plan


def _plan_shared(root: str, plan: PrunePlan, remaining: list[VersionInfo], running: bool, now_seconds: float, grace_seconds: float) -> None:
    """Shared files and folders no remaining version references (older than the grace period) into ``plan.shared``."""
    if running:
        plan.notes.append("shared files kept: an unfinished version is younger than the grace period (a running build may reuse them)")
        return
    unreadable = [info.version_id for info in remaining if info.manifest is None]
    if unreadable:
        plan.notes.append(f"shared files kept: the manifest of {', '.join(unreadable)} cannot be read, so what it references is unknown")
        return
    files: set[str] = set()
    trees: set[str] = set()
    trees_known = True
    for info in remaining:
        files.update(reference.path for reference in referenced_files(info.manifest) if reference.shared)
        used, known = referenced_trees(info.manifest)
        trees |= used
        trees_known = trees_known and known

    def old(items: list[StoredFile]) -> bool:
        times = [item.modified for item in items]
        return bool(items) and all(moment is not None for moment in times) and now_seconds - max(times) >= grace_seconds

    for folder in SHARED_FILE_FOLDERS:
        for item in tree_files(root, folder):
            if item.path not in files and old([item]):
                leftover = item.path.count("/") > 1  # documents/parts-<uuid>/...: a killed build's parts
                plan.shared.append({"path": item.path, "bytes": item.bytes, "kind": "leftover" if leftover else "file"})
    for folder in SHARED_TREE_FOLDERS:
        if folder == "embeddings" and not trees_known:
            plan.notes.append("embedding stores kept: a remaining version names no model key")
            continue
        for name in _subfolders(root, folder):
            path = f"{folder}/{name}"
            items = tree_files(root, path)
            if path not in trees and old(items):
                plan.shared.append({"path": path, "bytes": sum(item.bytes for item in items), "kind": "folder", "files": len(items)})


def prune(root: str, keep: int, older_than: str | None = None, grace: str = DEFAULT_GRACE, dry_run: bool = False,
          now: datetime.datetime | None = None) -> PrunePlan:
    """Plan, then (unless ``dry_run``) remove: finished versions (manifest first), unfinished folders, shared files."""
    plan = plan_prune(root, keep, older_than, grace, now, dry_run)
    if dry_run:
        return plan
    filesystem, _ = storage.filesystem_and_path(root)
    for row in plan.versions:
        manifest_url = storage.join_url(root, row["path"], "manifest.json")
        _, manifest_path = storage.filesystem_and_path(manifest_url)
        filesystem.rm(manifest_path)  # first: an interrupted prune leaves an unfinished folder, not a damaged version
        storage.remove_tree(storage.join_url(root, row["path"]))
    for row in plan.unfinished:
        storage.remove_tree(storage.join_url(root, row["path"]))
    paths = [storage.filesystem_and_path(storage.join_url(root, row["path"]))[1] for row in plan.shared if row["kind"] != "folder"]
    if paths:
        filesystem.rm(paths)
    for row in plan.shared:
        if row["kind"] == "folder":
            storage.remove_tree(storage.join_url(root, row["path"]))
    _remove_empty_folders(root, plan)
    plan.removed = True
    return plan


def _remove_empty_folders(root: str, plan: PrunePlan) -> None:
    """Local disks keep empty folders (documents/parts-*/ after their parts): remove those the plan emptied."""
    filesystem, _ = storage.filesystem_and_path(root)
    if not storage.is_local(filesystem):
        return
    import os

    parents = {row["path"].rsplit("/", 1)[0] for row in plan.shared if row["kind"] == "leftover"}
    for parent in sorted(parents, reverse=True):
        _, path = storage.filesystem_and_path(storage.join_url(root, parent))
        try:
            os.rmdir(path)
        except OSError:
            pass


# --- tables ----------------------------------------------------------------------------------------


def list_table(finished: list[VersionInfo], unfinished: list[VersionInfo]) -> str:
    from pipelines.runtime import format_table

    rows = []
    for info in finished:
        status = ", ".join(word for word, on in (("CURRENT", info.current), ("pinned", info.pinned)) if on)
        if info.error:
            rows.append((info.version_id, info.created_at or "-", "-", "-", "-", "-", "-", "-", f"{status} damaged: {info.error}".strip()))
            continue
        rows.append((info.version_id, info.created_at[:19].replace("T", " "), info.documents, info.quarantined, info.factory + (" +BM25" if info.sparse else ""),
                     info.shards, info.bytes, info.model, status))
    text = format_table(rows, title=f"{len(finished)} finished version(s), oldest first",
                        headers=("version", "created (UTC)", "documents", "quarantined", "index", "shards", "bytes", "model", "status"))
    if unfinished:
        text += "\n\n" + format_table([(info.version_id, format_duration(info.age_seconds), info.files, info.folder_bytes) for info in unfinished],
                                      title=f"{len(unfinished)} unfinished version folder(s) (no manifest.json)",
                                      headers=("version", "last written", "files", "bytes"))
    return text


def prune_table(plan: PrunePlan) -> str:
    from pipelines.runtime import format_table

    verb = "would remove" if plan.dry_run else "removed"
    rows = [("version", row["path"], row["bytes"], f"finished, created {row['created_at'][:19]}") for row in plan.versions]
    rows += [("unfinished", row["path"], row["bytes"], f"no manifest, last written {row['age']} ago") for row in plan.unfinished]
    rows += [(row["kind"], row["path"], row["bytes"], "referenced by no remaining version") for row in plan.shared]
    parts = [format_table(rows, title=f"{'dry run: ' if plan.dry_run else ''}{verb} {len(rows)} item(s), {plan.bytes_freed:,} bytes",
                          headers=("kind", "path", "bytes", "why")) if rows else f"{'dry run: ' if plan.dry_run else ''}nothing to remove"]
    kept = [(row["version_id"], row["why"]) for row in plan.kept] + [(row["version_id"], f"unfinished: {row['why']}") for row in plan.unfinished_kept]
    if kept:
        parts.append(format_table(kept, title="kept", headers=("version", "why")))
    parts += [f"note: {note}" for note in plan.notes]
    parts.append(f"bytes freed: {plan.bytes_freed:,}" + (" (dry run: nothing removed)" if plan.dry_run else ""))
    return "\n\n".join(parts)


def show_text(shown: dict[str, Any]) -> str:
    from pipelines.runtime import format_table

    row = shown["version"]
    status = ", ".join(word for word, on in (("CURRENT", row["current"]), ("pinned", row["pinned"])) if on) or "-"
    text = format_table([("created (UTC)", row["created_at"]), ("status", status), ("documents", row["documents"]), ("quarantined", row["quarantined"]),
                         ("index", row["factory"]), ("shards", row["shards"]), ("BM25", "yes" if row["sparse"] else "no"), ("bytes", row["bytes"]),
                         ("model", row["model"])], title=f"index version {row['version_id']}")
    if shown["pin"]:
        text += f"\n\npinned by {shown['pin'].get('pinned_by', '?')} at {shown['pin'].get('pinned_at', '?')}" + (f": {shown['pin']['note']}" if shown["pin"].get("note") else "")
    for entry in shown["history"]:
        text += f"\nmade CURRENT at {entry['published_at']} ({entry.get('reason', '?')}, by {entry.get('by', '?')}; previous {entry.get('previous')})"
    if shown["summary"] is not None:
        text += "\n\nsummary.json\n" + json.dumps(shown["summary"], indent=2)
    text += "\n\nmanifest.json\n" + json.dumps(shown["manifest"], indent=2)
    return text
