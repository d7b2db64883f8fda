"""Two-stage retrieval pipelines: one module per stage, in pipeline order.

documents (read + validate) -> embedding -> index_building -> index_store (versions, manifest)
-> shard_search (retrieve) -> reranking -> evaluation; training builds domain rerankers.
"""

__version__ = "0.1.0"
