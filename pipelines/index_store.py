"""Index versions on storage: layout, manifest, the CURRENT pointer, and validated loading.

Layout under an index root URL::

    CURRENT                          the current version id, replaced atomically
    embeddings/<model key>/part-*.parquet
    versions/<version id>/
        trained.faiss                the trained, empty index every shard was filled from
        shard-00000.faiss            one faiss file per shard (ids = global document positions)
        shard-00000.vectors.npy      exact float32 vectors of the shard, for exact re-scoring
        shard-00000.json             shard stats, written when the shard is complete (unit of resume)
        doc_ids.parquet              position -> (id, text_hash)
        quarantine/part-*.parquet    rows that were not indexed, with the reason
        summary.json                 counts, throughput, wall time
        manifest.json                written last: a version without it is unfinished

A version is immutable once its manifest exists. Readers go through CURRENT (or name a version),
so they see one whole version, never a mixture.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from pipelines import storage

MANIFEST_FORMAT = 1
REQUIRED_MANIFEST_KEYS = ("format", "version_id", "created_at", "model", "index", "shards", "doc_ids", "counts", "corpus", "embeddings")


class IndexValidationError(ValueError):
    """An index version is missing, unfinished, or does not match its manifest."""


def versions_url(root: str) -> str:
    return storage.join_url(root, "versions")


def version_url(root: str, version_id: str) -> str:
    return storage.join_url(root, "versions", version_id)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def serialize_index(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize_index(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def vectors_to_bytes(vectors: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def vectors_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def publish(root: str, version_id: str) -> None:
    """Point CURRENT at a finished version (atomically: readers see the old or the new id)."""
    if not storage.exists(storage.join_url(version_url(root, version_id), "manifest.json")):
        raise IndexValidationError(f"{version_url(root, version_id)}: no manifest.json; the version is unfinished")
    storage.write_bytes_atomically(storage.join_url(root, "CURRENT"), f"{version_id}\n".encode())


def current_version_id(root: str) -> str:
    pointer = storage.join_url(root, "CURRENT")
    if not storage.exists(pointer):
        raise IndexValidationError(f"{root}: no index here (no CURRENT pointer); build one with jobs.build_index")
    return storage.read_bytes(pointer).decode().strip()


def list_versions(root: str) -> list[dict[str, Any]]:
    """Finished versions (those with a manifest), oldest first."""
    filesystem, path = storage.filesystem_and_path(versions_url(root))
    if not filesystem.exists(path):
        return []
    manifests = []
    for entry in filesystem.ls(path, detail=False):
        manifest_url = storage.to_url(filesystem, f"{entry}/manifest.json")
        if storage.exists(manifest_url):
            manifests.append(storage.read_json(manifest_url))
    return sorted(manifests, key=lambda manifest: manifest["created_at"])


def read_manifest(root: str, version_id: str | None = None) -> dict[str, Any]:
    """The manifest of a version (CURRENT by default), with its required keys checked."""
    version_id = version_id or current_version_id(root)
    manifest_url = storage.join_url(version_url(root, version_id), "manifest.json")
    if not storage.exists(manifest_url):
        raise IndexValidationError(f"{manifest_url}: missing; version {version_id} is unfinished or does not exist")
    manifest = storage.read_json(manifest_url)
    missing = [key for key in REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise IndexValidationError(f"{manifest_url}: missing keys {missing}")
    if manifest["format"] != MANIFEST_FORMAT:
        raise IndexValidationError(f"{manifest_url}: format {manifest['format']} is not the supported {MANIFEST_FORMAT}")
    if manifest["version_id"] != version_id:
        raise IndexValidationError(f"{manifest_url}: names version {manifest['version_id']}, expected {version_id}")
    return manifest


def read_checked(url: str, expected_sha256: str) -> bytes:
    """Read a file and verify its checksum against the manifest."""
    if not storage.exists(url):
        raise IndexValidationError(f"{url}: listed in the manifest but missing")
    data = storage.read_bytes(url)
    actual = storage.sha256_bytes(data)
    if actual != expected_sha256:
        raise IndexValidationError(f"{url}: checksum mismatch (manifest {expected_sha256[:12]}…, file {actual[:12]}…); the file is damaged or was replaced")
    return data


@dataclass
class IndexShard:
    """One loaded shard: its faiss index, the global positions it covers, and (optionally) exact vectors."""

    number: int
    index: faiss.Index
    first_position: int
    vectors: np.ndarray | None = None


@dataclass
class LoadedIndex:
    """A validated index version, ready to search."""

    root: str
    manifest: dict[str, Any]
    shards: list[IndexShard] = field(default_factory=list)
    doc_ids: pa.Table | None = None

    @property
    def dimension(self) -> int:
        return int(self.manifest["model"]["dimension"])

    @property
    def count(self) -> int:
        return int(self.manifest["counts"]["indexed"])


def load_shard(root: str, manifest: dict[str, Any], shard: int, with_vectors: bool = False) -> IndexShard:
    """Load and validate one shard against the manifest (checksum, dimension, count)."""
    entry = manifest["shards"][shard]
    folder = version_url(root, manifest["version_id"])
    url = storage.join_url(folder, entry["file"])
    index = deserialize_index(read_checked(url, entry["sha256"]))
    if index.d != manifest["model"]["dimension"]:
        raise IndexValidationError(f"{url}: dimension {index.d}, manifest says {manifest['model']['dimension']}")
    if index.ntotal != entry["count"]:
        raise IndexValidationError(f"{url}: {index.ntotal} vectors, manifest says {entry['count']}")
    nprobe = manifest["index"].get("nprobe") or 0
    if nprobe:
        faiss.extract_index_ivf(index).nprobe = nprobe
    vectors = load_shard_vectors(root, manifest, shard) if with_vectors else None
    return IndexShard(number=shard, index=index, first_position=entry["first_position"], vectors=vectors)


def load_shard_vectors(root: str, manifest: dict[str, Any], shard: int) -> np.ndarray:
    """The exact float32 vectors of one shard, validated against the manifest (checksum, shape)."""
    entry = manifest["shards"][shard]
    dimension = manifest["model"]["dimension"]
    vectors_url = storage.join_url(version_url(root, manifest["version_id"]), entry["vectors_file"])
    vectors = vectors_from_bytes(read_checked(vectors_url, entry["vectors_sha256"]))
    if vectors.shape != (entry["count"], dimension):
        raise IndexValidationError(f"{vectors_url}: shape {vectors.shape}, expected ({entry['count']}, {dimension})")
    return vectors


def load_doc_ids(root: str, manifest: dict[str, Any]) -> pa.Table:
    entry = manifest["doc_ids"]
    url = storage.join_url(version_url(root, manifest["version_id"]), entry["file"])
    table = storage.read_parquet_bytes(read_checked(url, entry["sha256"]))
    if table.num_rows != manifest["counts"]["indexed"]:
        raise IndexValidationError(f"{url}: {table.num_rows} ids, manifest says {manifest['counts']['indexed']}")
    return table


def load_index(root: str, version_id: str | None = None, with_vectors: bool = False) -> LoadedIndex:
    """Load a whole version (CURRENT by default), validating the manifest and every checksum."""
    manifest = read_manifest(root, version_id)
    shards = [load_shard(root, manifest, number, with_vectors) for number in range(len(manifest["shards"]))]
    return LoadedIndex(root=root, manifest=manifest, shards=shards, doc_ids=load_doc_ids(root, manifest))


def corpus_fingerprint(doc_ids: pa.Table) -> str:
    """A short hash of an index version's document ids (``load_doc_ids``): tells whether a reranker
    is served on the corpus it was trained on, wherever that corpus was copied."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(doc_ids["id"].to_pylist())).encode()).hexdigest()[:16]
