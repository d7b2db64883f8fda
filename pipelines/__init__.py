"""Two-stage retrieval pipelines: one module per stage, in pipeline order.

documents (read + validate) -> embedding -> index_building -> index_store (versions, manifest)
-> shard_search (retrieve) -> reranking -> evaluation; training builds domain rerankers.
"""

__version__ = "0.1.0"


def source_digest() -> str:
    """A sha256 (16 hex digits) of the package's own Python sources: the code version where git is not
    (``ray job submit --working-dir`` uploads the tree without ``.git``). Files in sorted path order,
    each as its path relative to the repository root and its bytes."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in ("pipelines", "jobs"):
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(f"{path.relative_to(root).as_posix()}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
