"""Process-level plumbing shared by the jobs: Ray start-up, process-local storage, summary tables."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from pipelines import storage

PROCESS_LOCAL_PROTOCOLS = ("memory",)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the running Ray cluster (``ray job submit``, RAY_ADDRESS) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    options = os.environ.get(storage.OPTIONS_VARIABLE)
    runtime_env = {"env_vars": {storage.OPTIONS_VARIABLE: options}} if options else None  # --storage.options on every worker of the job
    ray.init(num_cpus=num_cpus, ignore_reinit_error=True, log_to_driver=True, configure_logging=False, runtime_env=runtime_env)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = True


def resolve_broadcast(value):
    """A value broadcast to Ray Data batch functions as an object reference, resolved.

    Large lookup tables travel once through the object store (``ray.put``); stages that Ray fuses into
    an actor do not resolve references passed in ``fn_args``, so every batch function calls this.
    """
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def collect(dataset):
    """A (small) Ray Dataset's rows on the driver as one Arrow table; None when it has no rows."""
    import pyarrow as pa
    import ray

    tables = [table for table in ray.get(dataset.to_arrow_refs()) if table.num_rows]
    return pa.concat_tables(tables) if tables else None


def public_url(text: str, effective_root: str, public_root: str) -> str:
    """Name files under the root the user gave, not under the temporary mirror of process-local storage.

    ``text`` is a URL or a message naming URLs; the mirror (a uniquely named local folder) may be
    spelt as a path or as a ``file://`` URL, as listings return it.
    """
    if effective_root == public_root:
        return text
    filesystem, path = storage.filesystem_and_path(effective_root)
    for mirror in (storage.to_url(filesystem, path.rstrip("/")), effective_root.rstrip("/")):
        text = text.replace(mirror, public_root.rstrip("/"))
    return text


def is_process_local(url: str) -> bool:
    """True for storage that only this process can see (memory://): Ray workers would see it empty."""
    filesystem, _ = storage.filesystem_and_path(url)
    protocols = filesystem.protocol if isinstance(filesystem.protocol, (tuple, list)) else (filesystem.protocol,)
    return any(protocol in PROCESS_LOCAL_PROTOCOLS for protocol in protocols)


def _copy_tree(source_url: str, target_url: str) -> None:
    """Copy a file or a folder's contents between process-local storage and a local folder (fsspec ``get``/``put``)."""
    source_fs, source_path = storage.filesystem_and_path(source_url)
    target_fs, target_path = storage.filesystem_and_path(target_url)
    if not source_fs.exists(source_path):
        return
    folder = source_fs.isdir(source_path)
    source, target = (source_path.rstrip("/") + "/", target_path.rstrip("/") + "/") if folder else (source_path, target_path)
    if storage.is_local(target_fs):
        source_fs.get(source, target, recursive=folder)
    elif storage.is_local(source_fs):
        target_fs.put(source, target, recursive=folder)
    else:
        raise ValueError(f"cannot mirror {source_url} to {target_url}: one side must be local")


@contextlib.contextmanager
def worker_visible(url: str, copy_back: bool = False, local_only: bool = False) -> Iterator[str]:
    """A URL that Ray workers can read (and write) for ``url``.

    Shared storage (local disk on one node, S3, GCS...) is yielded unchanged. Process-local storage
    (memory://) is mirrored into a temporary local folder for the duration, and copied back at the
    end when ``copy_back`` is set. Process-local storage cannot span a multi-node cluster.
    With ``local_only`` every non-local URL is mirrored (for libraries that write plain files).
    """
    filesystem, _ = storage.filesystem_and_path(url)
    if not is_process_local(url) and not (local_only and not storage.is_local(filesystem)):
        yield url
        return
    folder = tempfile.mkdtemp(prefix="retrieval-process-local-")
    local = os.path.join(folder, url.rstrip("/").rsplit("/", 1)[-1] or "root")
    try:
        _copy_tree(url, local)
        yield local
        if copy_back:
            _copy_tree(local, url)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def format_table(rows: Sequence[Sequence[object]], title: str = "", headers: Sequence[str] = (), left_columns: int = 1, markdown: bool = False) -> str:
    """A text table (tabulate) for job summaries, metrics and benchmarks: the first ``left_columns`` columns
    left-aligned, the rest right-aligned; floats with one decimal and ints with thousands separators
    unless already formatted as text; ``markdown`` gives a GitHub table for notes and READMEs."""
    from tabulate import tabulate

    def cell(value: object) -> str:
        if isinstance(value, bool) or value is None:
            return "-" if value is None else str(value)
        if isinstance(value, float):
            return f"{value:,.1f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    body = [[cell(value) for value in row] for row in rows]
    width = len(body[0]) if body else len(headers)
    alignment = ["left"] * min(left_columns, width) + ["right"] * max(0, width - left_columns)
    table = tabulate(body, headers=list(headers), tablefmt="github" if markdown else "simple", colalign=alignment, disable_numparse=True)
    return f"{title}\n{table}" if title else table
