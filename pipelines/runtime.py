"""Process-level plumbing shared by the jobs: Ray start-up, process-local storage, summary tables."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from pipelines import storage

PROCESS_LOCAL_PROTOCOLS = ("memory",)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the running Ray cluster (``ray job submit``, RAY_ADDRESS) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    ray.init(num_cpus=num_cpus, ignore_reinit_error=True, log_to_driver=True, configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = True


def resolve_broadcast(value):
    """A value broadcast to Ray Data batch functions as an object reference, resolved.

    Large lookup tables travel once through the object store (``ray.put``); stages that Ray fuses into
    an actor do not resolve references passed in ``fn_args``, so every batch function calls this.
    """
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def is_process_local(url: str) -> bool:
    """True for storage that only this process can see (memory://): Ray workers would see it empty."""
    filesystem, _ = storage.filesystem_and_path(url)
    protocols = filesystem.protocol if isinstance(filesystem.protocol, (tuple, list)) else (filesystem.protocol,)
    return any(protocol in PROCESS_LOCAL_PROTOCOLS for protocol in protocols)


def _copy_tree(source_url: str, target_url: str) -> None:
    source_fs, source_path = storage.filesystem_and_path(source_url)
    target_fs, target_path = storage.filesystem_and_path(target_url)
    if not source_fs.exists(source_path):
        return
    if source_fs.isfile(source_path):
        files = [source_path]
        base = source_path
    else:
        files = source_fs.find(source_path)
        base = source_path.rstrip("/") + "/"
    for file_path in files:
        relative = "" if file_path == base else file_path[len(base):]
        destination = f"{target_path}/{relative}" if relative else target_path
        parent = destination.rsplit("/", 1)[0]
        if parent:
            target_fs.makedirs(parent, exist_ok=True)
        target_fs.pipe_file(destination, source_fs.cat_file(file_path))


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


def format_table(rows: list[tuple[str, object]], title: str = "") -> str:
    """A two-column text table for end-of-job summaries."""
    formatted = [(name, f"{value:,.1f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)) for name, value in rows]
    width = max(len(name) for name, _ in formatted)
    value_width = max(len(value) for _, value in formatted)
    line = "-" * (width + value_width + 3)
    body = "\n".join(f"{name:<{width}}   {value:>{value_width}}" for name, value in formatted)
    return "\n".join(part for part in (title, line, body, line) if part)
