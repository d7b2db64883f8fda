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
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import faiss

from pipelines import storage

MANIFEST_FORMAT = 1
DOC_IDS_FILE = "doc_ids.parquet"
REQUIRED_MANIFEST_KEYS = ("format", "version_id", "created_at", "model", "index", "shards", "doc_ids", "counts", "corpus", "embeddings")


class IndexValidationError(ValueError):
    """An index version is missing, unfinished, or does not match its manifest."""


MODELS_FOLDER = "models"
SPARSE_FOLDER = "sparse"  # BM25 shard term counts, shared by versions (pipelines.sparse_index)


def plain_name(value: object, what: str, source: str) -> str:
    """``value`` if it names a file or folder directly inside a known folder, else IndexValidationError.

    Version ids, CURRENT's contents and the manifest's file entries come from storage that anyone
    with write access can change; a '/', '..' or a scheme would point reads outside the index.
    """
    if not isinstance(value, str) or not value.strip() or "/" in value or "\\" in value or ".." in value or ":" in value or value != value.strip():
        raise IndexValidationError(f"{source}: {what} {value!r} is not a plain name inside the index (no '/', '..' or scheme)")
    return value


def check_manifest_paths(manifest: dict[str, Any], source: str) -> None:
    """Every file the manifest names must be a plain name inside its version (or the root's models folder)."""
    for number, entry in enumerate(manifest["shards"]):
        plain_name(entry.get("file"), f"shards[{number}].file", source)
        if "vectors_file" in entry:
            plain_name(entry["vectors_file"], f"shards[{number}].vectors_file", source)
    if "file" in manifest["doc_ids"]:
        plain_name(manifest["doc_ids"]["file"], "doc_ids.file", source)
    sparse = manifest.get("sparse")
    if sparse:
        plain_name(sparse["statistics"].get("file"), "sparse.statistics.file", source)
        for number, entry in enumerate(sparse["shards"]):
            folder, _, name = str(entry.get("file")).partition("/")
            if folder != SPARSE_FOLDER:
                raise IndexValidationError(f"{source}: sparse.shards[{number}].file {entry.get('file')!r} is not a file under the index's {SPARSE_FOLDER}/")
            plain_name(name, f"sparse.shards[{number}].file", source)
    quantized = manifest["model"].get("quantized_model")
    if quantized:
        folder, _, name = str(quantized).partition("/")
        if folder != MODELS_FOLDER:
            raise IndexValidationError(f"{source}: model.quantized_model {quantized!r} is not a folder under the index's {MODELS_FOLDER}/")
        plain_name(name, "model.quantized_model", source)


def quantized_model_url(root: str, manifest: dict[str, Any]) -> str:
    """The int8 bi-encoder a version's documents were embedded with ("" for a float index)."""
    quantized = manifest["model"].get("quantized_model")
    if not quantized:
        return ""
    check_manifest_paths(manifest, storage.join_url(version_url(root, manifest["version_id"]), "manifest.json"))
    return storage.join_url(root, quantized)


def versions_url(root: str) -> str:
    return storage.join_url(root, "versions")


def version_url(root: str, version_id: str) -> str:
    return storage.join_url(root, "versions", plain_name(version_id, "version id", root))


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def serialize_index(index: faiss.Index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize_index(data: bytes) -> faiss.Index:
    import faiss

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
    try:
        content = storage.read_bytes(pointer).decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise IndexValidationError(f"{pointer}: not a version id ({error})") from None
    return plain_name(content, "CURRENT's version id", pointer)


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


@dataclass
class Manifest:
    """What a finished version holds: written last, so a version without ``manifest.json`` is unfinished.

    Readers get it as a plain dict (:func:`read_manifest`), validated by :meth:`check`.
    """

    version_id: str
    created_at: str
    code_version: dict[str, Any]
    model: dict[str, Any]
    documents: dict[str, Any]
    index: dict[str, Any]
    shards: list[dict[str, Any]]
    counts: dict[str, Any]
    corpus: dict[str, Any]
    embeddings: dict[str, Any]
    quarantine: dict[str, Any]
    doc_ids: dict[str, Any] = field(default_factory=dict)
    sparse: dict[str, Any] | None = None  # the BM25 part (pipelines.sparse_index); None when built with --sparse off
    format: int = MANIFEST_FORMAT

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        values = dataclasses.asdict(self)
        return {"format": values.pop("format"), "version_id": values.pop("version_id"), **values}

    @staticmethod
    def check(manifest: dict[str, Any], version_id: str, source: str) -> dict[str, Any]:
        """``manifest`` if it has every required key, the supported format, the expected id and confined paths."""
        missing = [key for key in REQUIRED_MANIFEST_KEYS if key not in manifest]
        if missing:
            raise IndexValidationError(f"{source}: missing keys {missing}")
        if manifest["format"] != MANIFEST_FORMAT:
            raise IndexValidationError(f"{source}: format {manifest['format']} is not the supported {MANIFEST_FORMAT}")
        if manifest["version_id"] != version_id:
            raise IndexValidationError(f"{source}: names version {manifest['version_id']}, expected {version_id}")
        check_manifest_paths(manifest, source)
        return manifest

    def write_version(self, root: str, doc_ids: pa.Table, summary: dict[str, Any], publish_now: bool) -> None:
        """Finish the version: doc ids, then the summary, then this manifest (last), then move CURRENT when asked.

        Shards and quarantine are already in the version folder; each write is atomic, and the
        manifest's existence is what makes the version finished.
        """
        folder = version_url(root, self.version_id)
        sha = storage.write_parquet_atomically(storage.join_url(folder, DOC_IDS_FILE), doc_ids.select(["position", "id", "text_hash"]))
        self.doc_ids = {"file": DOC_IDS_FILE, "sha256": sha, "count": doc_ids.num_rows}
        storage.write_json_atomically(storage.join_url(folder, "summary.json"), summary)
        storage.write_json_atomically(storage.join_url(folder, "manifest.json"), self.to_dict())
        if publish_now:
            publish(root, self.version_id)


def read_manifest(root: str, version_id: str | None = None) -> dict[str, Any]:
    """The manifest of a version (CURRENT by default), checked (:meth:`Manifest.check`)."""
    version_id = version_id or current_version_id(root)
    manifest_url = storage.join_url(version_url(root, version_id), "manifest.json")
    if not storage.exists(manifest_url):
        raise IndexValidationError(f"{manifest_url}: missing; version {version_id} is unfinished or does not exist")
    return Manifest.check(storage.read_json(manifest_url), version_id, manifest_url)


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
    import faiss

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
