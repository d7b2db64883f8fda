"""Index versions on storage (pipelines.index_store): loading validates the manifest and every checksum.

Each test damages its own copy of the damaged-corpus index that the session builds once.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import numpy as np
import pytest
from conftest import write_index_version

from pipelines import index_store, storage
from pipelines.index_store import IndexValidationError, load_index


@pytest.fixture
def index_copy(damaged_corpus_index, tmp_path):
    """A private copy of the built index: (root, version folder, manifest)."""
    root = tmp_path / "index"
    shutil.copytree(damaged_corpus_index.root, root)
    version = damaged_corpus_index.summary["version_id"]
    folder = root / "versions" / version
    return root, folder, json.loads((folder / "manifest.json").read_text())


def flip_a_byte(path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_built_index_loads_with_every_checksum_verified(index_copy):
    root, folder, manifest = index_copy
    loaded = load_index(str(root), with_vectors=True)
    assert loaded.manifest == manifest
    assert [shard.index.ntotal for shard in loaded.shards] == [entry["count"] for entry in manifest["shards"]]
    assert all(shard.vectors.shape == (entry["count"], loaded.dimension) for shard, entry in zip(loaded.shards, manifest["shards"]))
    assert loaded.doc_ids.num_rows == loaded.count == manifest["counts"]["indexed"]
    assert index_store.list_versions(str(root)) == [manifest]


def test_a_version_without_a_manifest_is_refused(index_copy):
    root, folder, manifest = index_copy
    (folder / "manifest.json").unlink()
    with pytest.raises(IndexValidationError, match=f"{folder}/manifest.json: missing; version {manifest['version_id']} is unfinished"):
        load_index(str(root))  # through CURRENT
    with pytest.raises(IndexValidationError, match="manifest.json: missing"):
        load_index(str(root), version_id=manifest["version_id"])
    with pytest.raises(IndexValidationError, match="no manifest.json; the version is unfinished"):
        index_store.publish(str(root), manifest["version_id"])
    assert index_store.list_versions(str(root)) == []


def test_an_index_root_without_current_is_refused(tmp_path):
    with pytest.raises(IndexValidationError, match="no CURRENT pointer"):
        load_index(str(tmp_path))


@pytest.mark.parametrize("file_key", ["file", "vectors_file"])
def test_a_damaged_shard_file_gives_a_checksum_error_naming_the_file(index_copy, file_key):
    root, folder, manifest = index_copy
    damaged = (root if file_key == "vectors_file" else folder) / manifest["shards"][1][file_key]  # vectors: root/vectors/<sha>.npy
    flip_a_byte(damaged)
    with pytest.raises(IndexValidationError, match=f"{damaged}: checksum mismatch") as error:
        load_index(str(root), with_vectors=True)
    assert "damaged or was replaced" in str(error.value)
    if file_key == "vectors_file":
        load_index(str(root), with_vectors=False)  # the exact vectors are only read (and checked) on request


def test_damaged_or_missing_files_are_named(index_copy):
    root, folder, manifest = index_copy
    doc_ids = folder / "doc_ids.parquet"
    flip_a_byte(doc_ids, offset=30)
    with pytest.raises(IndexValidationError, match=f"{doc_ids}: checksum mismatch"):
        load_index(str(root))
    missing = folder / manifest["shards"][2]["file"]
    missing.unlink()
    with pytest.raises(IndexValidationError, match=f"{missing}: listed in the manifest but missing"):
        load_index(str(root))


def rewrite_manifest(folder, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("shards"), r"missing keys \['shards'\]"),
        (lambda m: m.update(format=99), "format 99 is not the supported 1"),
        (lambda m: m.update(version_id="0123456789abcdef"), "names version 0123456789abcdef, expected"),
        (lambda m: m["shards"][0].update(count=m["shards"][0]["count"] + 1), r"shard-00000.faiss: \d+ vectors, manifest says \d+"),
        (lambda m: m["model"].update(dimension=384), "shard-00000.faiss: dimension 32, manifest says 384"),
        (lambda m: m["counts"].update(indexed=1), r"doc_ids.parquet: \d+ ids, manifest says 1"),
    ],
)
def test_a_manifest_that_does_not_match_the_files_is_refused(index_copy, change, message):
    root, folder, _ = index_copy
    rewrite_manifest(folder, change)
    with pytest.raises(IndexValidationError, match=message):
        load_index(str(root))


# --- re-scoring vectors: float16 under the root's vectors/, memory-mapped; float32 in older versions ---------


def unit_vectors(count: int, dimension: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, dimension)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_local_re_scoring_vectors_are_memory_mapped_after_a_streamed_checksum(tmp_path, monkeypatch):
    vectors = unit_vectors(3_000, 16, seed=1)
    written = write_index_version(tmp_path, "IVF8,PQ8x4fs", vectors, shards=2)
    manifest = index_store.read_manifest(str(tmp_path), "v1")
    monkeypatch.setattr(index_store.storage, "read_bytes", lambda url: pytest.fail(f"{url} read whole into a bytes buffer"))
    for shard, entry in enumerate(written["shards"]):
        vectors_of_shard = index_store.load_shard_vectors(str(tmp_path), manifest, shard)
        assert isinstance(vectors_of_shard, np.memmap) and os.path.samefile(vectors_of_shard.filename, tmp_path / entry["vectors_file"])
        assert vectors_of_shard.dtype == np.float16 and not vectors_of_shard.flags.writeable
        start = entry["first_position"]
        np.testing.assert_array_equal(vectors_of_shard, vectors[start : start + entry["count"]].astype(np.float16))
    monkeypatch.undo()
    flip_a_byte(tmp_path / written["shards"][1]["vectors_file"])
    with pytest.raises(IndexValidationError, match=r"vectors/[0-9a-f]{32}\.npy: checksum mismatch"):
        index_store.load_shard_vectors(str(tmp_path), manifest, 1)


def test_re_scoring_vectors_on_other_storage_are_read_once_into_memory_and_checked(tmp_path):
    vectors = unit_vectors(1_000, 8, seed=2)
    manifest = write_index_version(tmp_path, "IVF4,PQ4x4fs", vectors, shards=1)
    entry = manifest["shards"][0]
    root = f"memory://index-store-test-{uuid.uuid4().hex[:8]}"
    try:
        data = (tmp_path / entry["vectors_file"]).read_bytes()
        storage.write_bytes_atomically(storage.join_url(root, entry["vectors_file"]), data)
        loaded = index_store.load_shard_vectors(root, manifest, 0)
        assert type(loaded) is np.ndarray and loaded.dtype == np.float16
        np.testing.assert_array_equal(loaded, vectors.astype(np.float16))
        for offset in (-5, 20):  # in the data, in the .npy header
            damaged = bytearray(data)
            damaged[offset] ^= 0xFF
            storage.write_bytes_atomically(storage.join_url(root, entry["vectors_file"]), bytes(damaged))
            with pytest.raises(IndexValidationError, match="checksum mismatch"):
                index_store.load_shard_vectors(root, manifest, 0)
        wrong = {**manifest, "shards": [{**entry, "vectors_dtype": "float32"}]}
        storage.write_bytes_atomically(storage.join_url(root, entry["vectors_file"]), data)
        with pytest.raises(IndexValidationError, match=r"a .npy file of another shape or type, expected float32 \(1000, 8\)"):
            index_store.load_shard_vectors(root, wrong, 0)
    finally:
        storage.remove_tree(root)


def test_a_version_with_float32_vectors_in_its_folder_still_loads_and_searches(tmp_path):
    from pipelines.shard_search import SearchConfig, ShardSearcher

    vectors = unit_vectors(3_000, 16, seed=3)
    manifest = write_index_version(tmp_path, "IVF8,PQ8x4fs", vectors, shards=2)
    folder = tmp_path / "versions" / "v1"
    for shard, entry in enumerate(manifest["shards"]):  # as versions were written before float16 and vectors/
        os.remove(tmp_path / entry["vectors_file"])
        data = index_store.vectors_to_bytes(vectors[entry["first_position"] : entry["first_position"] + entry["count"]], "float32")
        name = f"{index_store.shard_name(shard)}.vectors.npy"
        entry.update(vectors_file=name, vectors_sha256=storage.write_bytes_atomically(str(folder / name), data), vectors_bytes=len(data))
        del entry["vectors_dtype"]
    storage.write_json_atomically(str(folder / "manifest.json"), manifest)
    queries = unit_vectors(50, 16, seed=4)
    batch = {"query_embedding": queries}
    for shard, entry in enumerate(manifest["shards"]):
        searcher = ShardSearcher(str(tmp_path), "v1", shard, SearchConfig(top_k=10))
        assert searcher.rescoring and isinstance(searcher.shard.vectors, np.memmap) and searcher.shard.vectors.dtype == np.float32
        start = entry["first_position"]
        np.testing.assert_array_equal(searcher.shard.vectors, vectors[start : start + entry["count"]])
        batch = searcher(batch)
    exact = queries @ vectors.T
    np.testing.assert_allclose(batch["candidate_scores"], np.take_along_axis(exact, batch["candidate_positions"], axis=1), atol=1e-5)  # float32: exact


@pytest.mark.parametrize(
    ("name", "accepted"),
    [("vectors/0123abcd.npy", True), ("shard-00000.vectors.npy", True), ("sparse/0123abcd.npy", False), ("vectors/../x.npy", False),
     ("vectors/a/b.npy", False), ("vectors/", False), ("s3://bucket/v.npy", False), ("/etc/passwd", False), ("..", False)],
)
def test_vectors_files_are_under_the_roots_vectors_folder_or_in_the_version(name, accepted):
    manifest = {"shards": [{"file": "shard-00000.faiss", "vectors_file": name}], "doc_ids": {}, "model": {}}
    if accepted:
        index_store.check_manifest_paths(manifest, "manifest.json")
    else:
        with pytest.raises(IndexValidationError, match=r"manifest.json: shards\[0\]\.vectors_file .* is not"):
            index_store.check_manifest_paths(manifest, "manifest.json")


# --- sq8 / sq6 re-scoring codes: uint8 codes under vectors/, their quantizer in the version ---------------------


@pytest.mark.parametrize("code", ["sq8", "sq6"])
def test_scalar_quantizer_codes_are_stored_loaded_and_re_score_as_their_decoded_vectors(tmp_path, code):
    from pipelines.shard_search import SearchConfig, ShardSearcher

    vectors = unit_vectors(3_000, 16, seed=5)
    manifest = write_index_version(tmp_path, "IVF8,PQ8x4fs", vectors, shards=2, rescoring_code=code)
    quantizer = tmp_path / "versions" / "v1" / index_store.RESCORING_QUANTIZER_FILE
    queries = unit_vectors(40, 16, seed=6)
    for shard, entry in enumerate(manifest["shards"]):
        assert (entry["vectors_dtype"], entry["vectors_code"], entry["quantizer_file"]) == ("uint8", code, "rescoring.faiss")
        assert entry["quantizer_sha256"] == storage.sha256_bytes(quantizer.read_bytes())
        codes = index_store.load_shard_vectors(str(tmp_path), manifest, shard)
        assert isinstance(codes, np.memmap) and codes.dtype == np.uint8 and codes.shape == (entry["count"], index_store.rescoring_code_size(code, 16))
        assert entry["vectors_bytes"] < codes.nbytes + 200 and codes.nbytes == entry["count"] * {"sq8": 16, "sq6": 12}[code]
        codec = index_store.load_rescoring_codec(str(tmp_path), manifest, shard)
        start = entry["first_position"]
        np.testing.assert_array_equal(codes, codec.sa_encode(vectors[start : start + entry["count"]]))
        decoded = codec.sa_decode(np.ascontiguousarray(codes))
        assert np.abs(decoded - vectors[start : start + entry["count"]]).max() < {"sq8": 0.01, "sq6": 0.05}[code]
        searcher = ShardSearcher(str(tmp_path), "v1", shard, SearchConfig(top_k=10))
        assert searcher.rescoring and searcher.shard.codec is not None and searcher.candidates == 50
        positions, scores = searcher.search(queries)
        assert (positions >= start).all() and (positions < start + entry["count"]).all()
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, decoded[positions - start]), rtol=0, atol=1e-6)  # exact for the stored code


def test_float16_versions_have_no_codec_and_keep_the_float16_path(tmp_path):
    from pipelines.shard_search import SearchConfig, ShardSearcher

    vectors = unit_vectors(2_000, 16, seed=7)
    manifest = write_index_version(tmp_path, "IVF8,PQ8x4fs", vectors, shards=1)
    assert "vectors_code" not in manifest["shards"][0] and manifest["shards"][0]["vectors_dtype"] == "float16"
    assert index_store.load_rescoring_codec(str(tmp_path), manifest, 0) is None
    shard = index_store.load_shard(str(tmp_path), manifest, 0, with_vectors=True)
    assert shard.codec is None and shard.vectors.dtype == np.float16
    assert ShardSearcher(str(tmp_path), "v1", 0, SearchConfig(top_k=10)).shard.codec is None


def test_damaged_or_mislabelled_scalar_quantizer_files_are_refused(tmp_path):
    vectors = unit_vectors(2_000, 16, seed=8)
    manifest = write_index_version(tmp_path, "IVF8,PQ8x4fs", vectors, shards=1, rescoring_code="sq8")
    root, folder = str(tmp_path), tmp_path / "versions" / "v1"
    quantizer = folder / index_store.RESCORING_QUANTIZER_FILE
    original = quantizer.read_bytes()
    flip_a_byte(quantizer)
    with pytest.raises(IndexValidationError, match=f"{quantizer}: checksum mismatch"):
        index_store.load_shard(root, manifest, 0, with_vectors=True)
    index_store.load_shard(root, manifest, 0, with_vectors=False)  # re-scoring data is only read (and checked) on request
    quantizer.write_bytes(original)
    codes = tmp_path / manifest["shards"][0]["vectors_file"]
    original = codes.read_bytes()
    flip_a_byte(codes)
    with pytest.raises(IndexValidationError, match=f"{codes}: checksum mismatch"):
        index_store.load_shard_vectors(root, manifest, 0)
    codes.write_bytes(original)
    for change, message in [
        ({"vectors_code": "sq6"}, r"uint8 \(2000, 16\), expected uint8 \(2000, 12\)"),  # sq6 codes would be 12 B
        ({"vectors_code": "sq4"}, "vectors_code 'sq4' / vectors_dtype 'uint8' in the manifest are not uint8 codes of sq8 or sq6"),
        ({"vectors_dtype": "float16"}, "are not uint8 codes"),
    ]:
        entry = {**manifest["shards"][0], **change}
        with pytest.raises(IndexValidationError, match=message):
            index_store.load_shard_vectors(root, {**manifest, "shards": [entry]}, 0)
    with pytest.raises(IndexValidationError, match="not a sq6 scalar quantizer of 16 dimensions"):
        index_store.load_rescoring_codec(root, {**manifest, "shards": [{**manifest["shards"][0], "vectors_code": "sq6"}]}, 0)
    with pytest.raises(IndexValidationError, match=r"shards\[0\]\.quantizer_file '\.\./rescoring\.faiss' is not a plain name"):
        index_store.check_manifest_paths({**manifest, "shards": [{**manifest["shards"][0], "quantizer_file": "../rescoring.faiss"}]}, "manifest.json")
