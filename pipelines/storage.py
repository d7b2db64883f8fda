"""Storage at the edges: every path is an fsspec URL, so local disk, S3, GCS and memory:// share one code path.

Everything the pipeline writes goes through :func:`write_bytes_atomically`: a reader (or a rerun
after a crash) sees either the whole file or no file, never a half-written one. On a local disk
that is a write to a temporary name followed by an atomic rename; on object stores a single PUT is
already atomic.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def filesystem_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it (protocol stripped).

    Listings are never cached: other processes (Ray workers, the next run) add files to the folders
    we list, and a cached listing would hide them (object stores' filesystems cache by default).
    """
    try:
        filesystem, path = fsspec.core.url_to_fs(str(url), use_listings_cache=False, **filesystem_options(str(url)))
    except ImportError:
        protocol = str(url).split("://", 1)[0] if "://" in str(url) else ""
        if protocol in OPTIONAL_FILESYSTEMS:
            package, extra = OPTIONAL_FILESYSTEMS[protocol]
            raise ImportError(f"{url}: {protocol}:// needs {package}, not installed; pip install 'retrieval-pipelines[{extra}]'") from None
        raise
    return filesystem, path


OPTIONS_VARIABLE = "PIPELINES_STORAGE_OPTIONS"  # JSON {protocol: {option: value}}: how --storage.options reaches Ray workers
SECRET_OPTION_WORDS = ("secret", "key", "token", "password", "credential", "signature", "sas")


@dataclass
class StorageConfig:
    """Filesystem settings for every URL a job opens (fsspec keyword arguments per protocol), on the driver and on Ray workers."""

    options: str = field(default="", metadata={"help": "YAML or JSON (or a file of it): per URL protocol, fsspec options, e.g. "
                                                        "'{s3: {endpoint_url: http://127.0.0.1:9000, profile: dev}}' or '{gs: {token: anon}}'; "
                                                        "secrets are never printed (prefer the environment or the nodes' credentials)"})

    def validate(self) -> None:
        parse_options(self.options)

    def parsed(self) -> dict[str, dict[str, Any]]:
        return parse_options(self.options)


def parse_options(text: str) -> dict[str, dict[str, Any]]:
    """``--storage.options`` as {protocol: {option: value}}: inline YAML/JSON, or the path of a file holding it."""
    import yaml

    if not text.strip():
        return {}
    source = "--storage.options"
    if "{" not in text and ":" not in text.split("://", 1)[-1]:
        source = text
        if not os.path.exists(text):
            raise ValueError(f"--storage.options {text}: neither YAML/JSON nor a file")
        with open(text) as handle:
            text = handle.read()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{source}: not YAML or JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(value, dict) or not all(isinstance(options, dict) for options in value.values()):
        raise ValueError(f"{source}: expected a mapping of URL protocol to options, e.g. {{s3: {{endpoint_url: ...}}}}")
    return {str(protocol): dict(options) for protocol, options in value.items()}


_options: dict[str, dict[str, Any]] | None = None


def configure(options: dict[str, dict[str, Any]]) -> None:
    """Use ``options`` for every filesystem this process opens, and in the processes it starts (an environment
    variable, which :func:`pipelines.runtime.ensure_ray` also hands to Ray's workers)."""
    global _options
    _options = dict(options)
    if options:
        os.environ[OPTIONS_VARIABLE] = json.dumps(options, sort_keys=True)
    else:
        os.environ.pop(OPTIONS_VARIABLE, None)


def configured_options() -> dict[str, dict[str, Any]]:
    """The storage options in effect: :func:`configure`'s, else the environment's (a Ray worker's), else none."""
    global _options
    if _options is None:
        text = os.environ.get(OPTIONS_VARIABLE, "")
        _options = json.loads(text) if text else {}
    return _options


def filesystem_options(url: str) -> dict[str, Any]:
    """The configured fsspec options for ``url``'s protocol (``s3a``/``s3n`` share ``s3``'s, ``gcs`` ``gs``'s)."""
    options = configured_options()
    if not options:
        return {}
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    aliases = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "local": "file"}
    return dict(options.get(protocol) or options.get(aliases.get(protocol, protocol)) or {})


def redacted(value: Any) -> Any:
    """``value`` with every secret-looking option replaced by ``***`` (for printed configs, run.json, manifests, logs)."""
    if isinstance(value, dict):
        return {key: "***" if any(word in str(key).lower() for word in SECRET_OPTION_WORDS) and not isinstance(item, dict) else redacted(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [redacted(item) for item in value]
    return value


OPTIONAL_FILESYSTEMS = {"gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure")}
"""URL protocols whose fsspec filesystem is an optional extra of this package: (package, extra)."""


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with '/'."""
    url = str(base).rstrip("/")
    for part in parts:
        url = f"{url}/{str(part).strip('/')}"
    return url


def to_url(filesystem: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URL (protocol included) for a path on ``filesystem``, usable by any process."""
    return filesystem.unstrip_protocol(path)


def is_local(filesystem: fsspec.AbstractFileSystem) -> bool:
    protocol = filesystem.protocol
    protocols = protocol if isinstance(protocol, (tuple, list)) else (protocol,)
    return "file" in protocols or "local" in protocols


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes_atomically(url: str, data: bytes) -> str:
    """Write ``data`` to ``url`` so that it appears whole or not at all; returns its sha256."""
    filesystem, path = filesystem_and_path(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        filesystem.makedirs(parent, exist_ok=True)
    if is_local(filesystem):
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    else:
        filesystem.pipe_file(path, data)
    return sha256_bytes(data)


def replace_local_folder(path: str, save) -> str:
    """Fill a local folder through ``save(temporary_path)`` (e.g. a model's ``save``), then swap it in by renames.

    A kill while saving leaves the previous folder (or none) at ``path``, never a half-written one.
    """
    import shutil

    path = os.path.abspath(path)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    save(temporary)
    if os.path.exists(path):
        retired = f"{path}.old-{uuid.uuid4().hex}"
        os.replace(path, retired)
        os.replace(temporary, path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(temporary, path)
    return path


def read_bytes(url: str) -> bytes:
    filesystem, path = filesystem_and_path(url)
    return filesystem.cat_file(path)


def require_input(url: str, setting: str) -> None:
    """FileNotFoundError naming the setting when an input file or folder does not exist (globs are left to the reader)."""
    if any(character in str(url) for character in "*?[") or exists(url):
        return
    raise FileNotFoundError(f"--{setting.replace('_', '-')} {url}: no such file or folder")


def exists(url: str) -> bool:
    filesystem, path = filesystem_and_path(url)
    return filesystem.exists(path)


def remove_tree(url: str) -> None:
    """Delete a folder and everything under it, if it exists."""
    filesystem, path = filesystem_and_path(url)
    if filesystem.exists(path):
        filesystem.rm(path, recursive=True)


def write_json_atomically(url: str, value: Any) -> str:
    return write_bytes_atomically(url, (json.dumps(value, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_parquet_atomically(url: str, table: pa.Table) -> str:
    """Write one Parquet file atomically; returns its sha256."""
    return write_bytes_atomically(url, table_to_parquet_bytes(table))


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    filesystem, path = filesystem_and_path(url)
    with filesystem.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def list_files(url: str, suffix: str = "") -> list[str]:
    """Full URLs of the files directly under a folder URL (sorted); empty if it does not exist."""
    filesystem, path = filesystem_and_path(url)
    if not filesystem.exists(path):
        return []
    entries = filesystem.ls(path, detail=True)
    files = [entry["name"] for entry in entries if entry.get("type") == "file" and entry["name"].endswith(suffix)]
    return sorted(to_url(filesystem, name) for name in files)


def read_parquet_bytes(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def write_parquet_part(batch: pa.Table, folder_url: str) -> pa.Table:
    """Ray Data batch function: write one batch as ``part-<uuid>.parquet`` atomically; returns (part, rows)."""
    url = join_url(folder_url, f"part-{uuid.uuid4().hex}.parquet")
    write_parquet_atomically(url, batch)
    return pa.table({"part": [url], "rows": [batch.num_rows]})


def write_parquet_parts(dataset, folder_url: str, rows_per_part: int) -> tuple[int, int]:
    """Write a Ray Dataset as atomically written Parquet parts under a folder; returns (rows, parts).

    Unlike a plain ``write_parquet``, a job killed mid-write leaves only whole parts behind.
    """
    written = dataset.map_batches(
        write_parquet_part, fn_args=(folder_url,), batch_size=rows_per_part, batch_format="pyarrow", num_cpus=0.25
    )
    return count_written(written, with_parts=True)


def count_written(written, with_parts: bool = False):
    """Rows (and parts) reported by a Ray Dataset of :func:`write_parquet_part` results, running it to the end."""
    rows = 0
    parts = 0
    for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += sum(batch["rows"].to_pylist())
        parts += batch.num_rows
    return (rows, parts) if with_parts else rows
