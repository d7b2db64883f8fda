"""Index versions on storage (pipelines.index_store): loading validates the manifest and every checksum.

Each test damages its own copy of the damaged-corpus index that the session builds once.
"""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines import index_store
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
    damaged = folder / manifest["shards"][1][file_key]
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
