"""Index versions on storage: layout, manifest, the CURRENT pointer, and validated loading.

Layout under an index root URL::

    CURRENT                          the current version id, replaced atomically
    embeddings/<model key>/part-*.parquet
    documents/<key>.arrow            document texts by position (Arrow IPC, batches of 1,024 rows), one file per
                                     fixed range of 102,400 positions, named by a hash of the range's (id, text_hash)
                                     list and shared by versions while unchanged (pipelines.document_store)
    documents/<key>.json             written after its .arrow file: sha256 and size (the file is complete)
    sparse/<key>.npz                 BM25 term counts of one shard, shared by versions (pipelines.sparse_index)
    vectors/<sha256>.npy             one shard's float16 re-scoring vectors (or their uint8 SQ8 / SQ6 codes),
                                     named by their content's hash, shared by versions (an unchanged shard in a
                                     rebuild references the existing file)
    versions/<version id>/
        trained.faiss                the trained, empty index every shard was filled from (a copy of the previous
                                     version's when an incremental build reused it: pipelines.incremental_index)
        rescoring.faiss              with re-scoring code sq8 / sq6 only: the trained, empty faiss
                                     IndexScalarQuantizer that encoded every shard's re-scoring codes
        shard-00000.faiss            one faiss file per shard (ids = global document positions)
        shard-00000.vectors.npy      versions before vectors/: the shard's float32 re-scoring vectors (still loaded)
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
DOCUMENTS_FOLDER = "documents"  # document texts by position, shared by versions (pipelines.document_store)
VECTORS_FOLDER = "vectors"  # shards' re-scoring vectors, content-addressed, shared by versions (write_shard_vectors)
VECTORS_DTYPE = "float16"  # of the re-scoring vectors written now; versions without ``vectors_dtype`` hold float32
RESCORING_QUANTIZER_FILE = "rescoring.faiss"  # in the version folder: the trained scalar quantizer of sq8 / sq6 re-scoring codes
SCALAR_QUANTIZER_TYPES = {"sq8": "QT_8bit", "sq6": "QT_6bit"}  # re-scoring code -> faiss.ScalarQuantizer type (one range per dimension)
RESCORING_CODES = ("float16", *SCALAR_QUANTIZER_TYPES)  # what re-scoring can read per vector: 2, 1 or 0.75 B x dimension


def rescoring_code_size(code: str, dimension: int) -> int:
    """Bytes per vector of a re-scoring code (pure arithmetic; what faiss's ScalarQuantizer ``code_size`` is).

    Example:
        >>> [rescoring_code_size(code, 384) for code in RESCORING_CODES]
        [768, 384, 288]
    """
    if code == "float16":
        return 2 * dimension
    if code == "sq8":
        return dimension
    if code == "sq6":
        return (6 * dimension + 7) // 8
    raise ValueError(f"re-scoring code {code!r}: choose one of {', '.join(RESCORING_CODES)}")


def train_rescoring_quantizer(code: str, vectors: np.ndarray) -> bytes:
    """A faiss ``IndexScalarQuantizer`` of ``code`` (sq8 / sq6) trained on a sample, serialized empty: the codec of a
    version's re-scoring codes (``sa_encode`` / ``sa_decode``; its per-dimension ranges are all it holds, a few kB)."""
    import faiss

    if code not in SCALAR_QUANTIZER_TYPES:
        raise ValueError(f"re-scoring code {code!r} has no quantizer to train (choose one of {', '.join(SCALAR_QUANTIZER_TYPES)})")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexScalarQuantizer(vectors.shape[1], getattr(faiss.ScalarQuantizer, SCALAR_QUANTIZER_TYPES[code]), faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    return serialize_index(index)


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
        if "vectors_file" in entry:  # vectors/<name> (shared), or a plain name in the version (versions before vectors/)
            folder, slash, name = str(entry["vectors_file"]).partition("/")
            if slash and folder != VECTORS_FOLDER:
                raise IndexValidationError(f"{source}: shards[{number}].vectors_file {entry['vectors_file']!r} is not a file under the index's {VECTORS_FOLDER}/ "
                                           f"or in its version")
            plain_name(name if slash else folder, f"shards[{number}].vectors_file", source)
        if "quantizer_file" in entry:  # sq8 / sq6 re-scoring codes: their quantizer, in the version folder
            plain_name(entry["quantizer_file"], f"shards[{number}].quantizer_file", source)
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
    store = manifest.get("documents_store")
    if store:
        for number, entry in enumerate(store["files"]):
            folder, _, name = str(entry.get("file")).partition("/")
            if folder != DOCUMENTS_FOLDER:
                raise IndexValidationError(f"{source}: documents_store.files[{number}].file {entry.get('file')!r} is not a file under the index's {DOCUMENTS_FOLDER}/")
            plain_name(name, f"documents_store.files[{number}].file", source)
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


def vectors_to_bytes(vectors: np.ndarray, dtype: str = VECTORS_DTYPE) -> bytes:
    """``vectors`` as a ``.npy`` file of ``dtype`` (float16: 2 B per dimension, round to nearest)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(vectors, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()


def vectors_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def vectors_file(sha256: str) -> str:
    """Where re-scoring vectors with this content hash live, relative to the index root."""
    return f"{VECTORS_FOLDER}/{sha256[:32]}.npy"


def write_shard_vectors(root: str, vectors: np.ndarray, quantizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Store one shard's re-scoring vectors (float16) under the root's ``vectors/``; returns the manifest's shard fields.

    With ``quantizer`` (``{"code": "sq8" or "sq6", "data": the serialized trained quantizer, "file": its name in the
    version folder, "sha256": its checksum}``) the file holds the vectors' uint8 codes instead (``sa_encode``; shape
    (count, code size)), and the fields name the code and the quantizer: ``vectors_dtype`` uint8,
    ``vectors_code``, ``quantizer_file``, ``quantizer_sha256`` (see :func:`rescoring_code_size` for the sizes and
    ``pipelines.index_building.rescoring_pairs`` for the recall each code keeps).

    The file is named by the hash of its content, so a version whose shard holds the same vectors
    (a rerun, or an incremental rebuild where only other shards changed) references the file an earlier
    version wrote instead of writing a copy. An existing file is checked (streamed) and rewritten, with
    the same bytes, only when damaged. (Named by content rather than by the shard's (id, text_hash) list:
    the fill task holds the vectors, not the keys, and a name can never stand for two contents.)

    Why float16 (768 B/vector at 384-d, half of float32) and not faiss's SQ8 (384 B/vector): recall@100 of
    IVF-PQ + re-scoring of 500 candidates against exact float32 search, by storage of the re-scored vectors.
    200,000 synthetic vectors shaped like MiniLM's (bench.index's generator and searcher), 1,000 queries,
    IVF2048,PQ192x4fs at nprobe 336: float32 0.9979 (recall@10 0.9996), float16 0.9977 (0.9994; the same
    top-10 in the same order as float32 for 97.6% of queries, top-100 overlap 0.9998), SQ8 0.9920 (0.9877;
    the same top-10 for 47%), SQ8 with one range for all dimensions 0.9901, no re-scoring 0.798. SciFact
    (5,183 documents, the stored int8 MiniLM vectors; 300 test queries, IVF132,PQ192x4fs, every list
    probed): nDCG@10 0.6530 with float32, float16 and exact search alike, 0.6531 with SQ8 (0.6473 without
    re-scoring); recall@100 against exact search 1.0, 0.9999 and 0.9955 (1,000 documents as queries: 1.0,
    0.9999, 0.9963). float16 keeps recall and nDCG; SQ8 loses about 0.005 of recall@100. So float16 stays the
    default, and sq8 / sq6 codes are written only when a memory budget needs them (at 1M, IVF4096,PQ192x4fs at
    nprobe 128: recall@100 0.970 with float16, 0.966 with sq8 at half the bytes, 0.951 with sq6 at 288 B/vector;
    ``pipelines.index_building.rescoring_pairs``).
    """
    if quantizer is None:
        data = vectors_to_bytes(vectors, VECTORS_DTYPE)
        described = {"vectors_dtype": VECTORS_DTYPE}
    else:
        codec = deserialize_index(quantizer["data"])
        codes = codec.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))
        data = vectors_to_bytes(codes, "uint8")
        described = {"vectors_dtype": "uint8", "vectors_code": quantizer["code"], "quantizer_file": quantizer["file"], "quantizer_sha256": quantizer["sha256"]}
    sha = storage.sha256_bytes(data)
    name = vectors_file(sha)
    url = storage.join_url(root, name)
    if not (storage.exists(url) and file_sha256(url) == sha):
        storage.write_bytes_atomically(url, data)
    return {"vectors_file": name, "vectors_sha256": sha, "vectors_bytes": len(data), **described}


READ_BLOCK = 1 << 20


def file_sha256(url: str) -> str:
    """The sha256 of a file, read in blocks (never whole in memory)."""
    import hashlib

    filesystem, path = storage.filesystem_and_path(url)
    digest = hashlib.sha256()
    with filesystem.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class _HashingReader:
    """A read-only file wrapper that hashes what passes through it (``np.lib.format.read_array`` reads it in blocks)."""

    def __init__(self, handle):
        import hashlib

        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        """Hash whatever the reader left (a damaged header may claim fewer bytes than the file has); the file's sha256."""
        for block in iter(lambda: self.read(READ_BLOCK), b""):
            pass
        return self.digest.hexdigest()


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
    documents_store: dict[str, Any] | None = None  # texts by position for reranking (pipelines.document_store); None in versions built before it
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
    _check_sha256(url, storage.sha256_bytes(data), expected_sha256)
    return data


def _check_sha256(url: str, actual: str, expected_sha256: str) -> None:
    if actual != expected_sha256:
        raise IndexValidationError(f"{url}: checksum mismatch (manifest {expected_sha256[:12]}…, file {actual[:12]}…); the file is damaged or was replaced")


@dataclass
class IndexShard:
    """One loaded shard: its faiss index, the global positions it covers, and (optionally) its re-scoring vectors
    (float16, float32 in older versions, or uint8 SQ codes with their ``codec``; read-only and memory-mapped
    when loaded from local files)."""

    number: int
    index: faiss.Index
    first_position: int
    vectors: np.ndarray | None = None
    codec: faiss.Index | None = None  # with sq8 / sq6 re-scoring codes: the trained quantizer that decodes ``vectors`` (uint8 codes)


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
    codec = load_rescoring_codec(root, manifest, shard) if with_vectors else None
    return IndexShard(number=shard, index=index, first_position=entry["first_position"], vectors=vectors, codec=codec)


def shard_vectors_url(root: str, manifest: dict[str, Any], shard: int) -> str:
    """The re-scoring vectors of a shard: under the root's ``vectors/``, or in the version folder (versions before it)."""
    name = manifest["shards"][shard]["vectors_file"]
    if name.startswith(f"{VECTORS_FOLDER}/"):
        return storage.join_url(root, name)
    return storage.join_url(version_url(root, manifest["version_id"]), name)


def load_rescoring_codec(root: str, manifest: dict[str, Any], shard: int) -> faiss.Index | None:
    """The trained scalar quantizer that decodes a shard's sq8 / sq6 re-scoring codes (None for float vectors),
    validated against the manifest (checksum, type, dimension)."""
    import faiss

    entry = manifest["shards"][shard]
    code = entry.get("vectors_code")
    if code is None:
        return None
    url = storage.join_url(version_url(root, manifest["version_id"]), plain_name(entry.get("quantizer_file"), "quantizer_file", "manifest"))
    if code not in SCALAR_QUANTIZER_TYPES:
        raise IndexValidationError(f"{url}: vectors_code {code!r} in the manifest is not one of {', '.join(SCALAR_QUANTIZER_TYPES)}")
    codec = deserialize_index(read_checked(url, entry.get("quantizer_sha256", "")))  # faiss returns the concrete (owning) class
    wanted = getattr(faiss.ScalarQuantizer, SCALAR_QUANTIZER_TYPES[code])
    if not isinstance(codec, faiss.IndexScalarQuantizer) or codec.sq.qtype != wanted or codec.d != manifest["model"]["dimension"]:
        raise IndexValidationError(f"{url}: not a {code} scalar quantizer of {manifest['model']['dimension']} dimensions")
    return codec


def load_shard_vectors(root: str, manifest: dict[str, Any], shard: int) -> np.ndarray:
    """The re-scoring vectors of one shard, validated against the manifest (checksum, dtype, shape): float16, or
    float32 for versions written before float16 (no ``vectors_dtype``), or uint8 sq8 / sq6 codes (``vectors_code``:
    shape (count, code size); decoded by :func:`load_rescoring_codec`'s quantizer).

    On a local filesystem the file is memory-mapped (read-only) after its checksum is taken once, streamed:
    pages are read on demand and shared by every process on the node that maps the same file (searchers of
    several versions sharing an unchanged shard's file included). On other storage it is read once into
    memory, hashed as it is read, with no intermediate bytes copy.
    """
    entry = manifest["shards"][shard]
    expected = (entry["count"], manifest["model"]["dimension"])
    url = shard_vectors_url(root, manifest, shard)
    code = entry.get("vectors_code")
    if code is not None:
        if code not in SCALAR_QUANTIZER_TYPES or entry.get("vectors_dtype") != "uint8":
            raise IndexValidationError(f"{url}: vectors_code {code!r} / vectors_dtype {entry.get('vectors_dtype')!r} in the manifest are not uint8 codes of "
                                       f"{' or '.join(SCALAR_QUANTIZER_TYPES)}")
        expected = (entry["count"], rescoring_code_size(code, manifest["model"]["dimension"]))
    elif entry.get("vectors_dtype", "float32") not in ("float16", "float32"):
        raise IndexValidationError(f"{url}: vectors_dtype {entry['vectors_dtype']!r} in the manifest is not float16 or float32")
    dtype = np.dtype(entry.get("vectors_dtype", "float32"))
    filesystem, path = storage.filesystem_and_path(url)
    if not filesystem.exists(path):
        raise IndexValidationError(f"{url}: listed in the manifest but missing")
    if storage.is_local(filesystem):
        _check_sha256(url, file_sha256(url), entry["vectors_sha256"])
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    else:
        with filesystem.open(path, "rb") as handle:
            reader = _HashingReader(handle)
            vectors = _read_npy(reader, expected, dtype)
            _check_sha256(url, reader.finish(), entry["vectors_sha256"])
    if vectors is None or vectors.shape != expected or vectors.dtype != dtype:
        found = f"{vectors.dtype} {vectors.shape}" if vectors is not None else "a .npy file of another shape or type"
        raise IndexValidationError(f"{url}: {found}, expected {dtype} {expected}")
    return vectors


def _read_npy(reader: _HashingReader, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray | None:
    """The array of a ``.npy`` stream whose header says ``shape`` and ``dtype`` (C order), read in blocks into
    one array; None, having read no further, for any other header (a damaged one may claim any size)."""
    try:
        version = np.lib.format.read_magic(reader)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        header = read_header(reader) if read_header else None
    except ValueError:
        return None
    if header is None or tuple(header[0]) != shape or header[1] or header[2] != dtype:
        return None
    out = np.empty(shape, dtype=dtype)
    target = memoryview(out).cast("B")
    filled = 0
    while filled < len(target):
        block = reader.read(min(READ_BLOCK, len(target) - filled))
        if not block:
            return None
        target[filled : filled + len(block)] = block
        filled += len(block)
    return out


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
