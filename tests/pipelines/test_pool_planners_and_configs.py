"""Actor pools are sized from the resources Ray reports, and the example YAML configs load into their jobs' settings."""

from __future__ import annotations


import pytest

from conftest import REPOSITORY
from pipelines.config import load_yaml_config, validate_config
from pipelines.embedding import EmbeddingConfig, plan_embedding_pool
from pipelines.reranking import RerankConfig
from pipelines.retrieval import plan_query_pools

CONFIGS = REPOSITORY / "jobs" / "configs"


@pytest.mark.parametrize(
    "cpus, gpus, expected",
    [
        (2, 0, (1, 1.0, 0.0, 2, "cpu")),  # one actor, one CPU back for read/write tasks, both cores as threads
        (8, 0, (1, 4.0, 0.0, 4, "cpu")),
        (16, 0, (3, 4.0, 0.0, 4, "cpu")),  # two CPUs back on larger machines
        (16, 2, (2, 4.0, 1.0, 4, "cuda")),  # one actor per GPU, 4 CPUs each to tokenize
    ],
)
def test_the_embedding_pool_leaves_room_for_read_and_write_tasks(cpus, gpus, expected):
    pool = plan_embedding_pool(EmbeddingConfig(), cpus, gpus)
    assert (pool.size, pool.num_cpus, pool.num_gpus, pool.threads, pool.device) == expected
    assert pool.size * pool.num_cpus <= max(cpus - 1, 0.5) or pool.device == "cuda"


def test_the_embedding_pool_honours_explicit_settings_and_refuses_a_missing_gpu():
    pool = plan_embedding_pool(EmbeddingConfig(pool_size=2, threads_per_actor=1), 8, 0)
    assert (pool.size, pool.threads) == (2, 1)
    assert plan_embedding_pool(EmbeddingConfig(device="cpu"), 16, 2).device == "cpu"
    with pytest.raises(ValueError, match="no GPU"):
        plan_embedding_pool(EmbeddingConfig(device="cuda"), 16, 0)


@pytest.mark.parametrize("cpus, gpus, shards", [(2, 0, 1), (2, 0, 4), (4, 0, 2), (16, 0, 8), (16, 2, 4), (64, 8, 16), (2, 0, 12), (64, 0, 12)])
@pytest.mark.parametrize("reranker", ["m", "none"])
def test_the_query_pools_fit_the_cluster_with_room_for_tasks(cpus, gpus, shards, reranker):
    pools = plan_query_pools(cpus, gpus, shards, RerankConfig(model=reranker), sparse_shards=shards)
    claimed = pools.encoder_cpus + pools.search.claimed_cpus + pools.reranker_size * pools.reranker_cpus
    assert claimed <= cpus - 0.5 + 1e-9  # half a CPU stays free for the read, rank and write tasks
    assert sorted(shard for dense, _ in pools.search.groups for shard in dense) == list(range(shards))
    if reranker == "none":
        assert pools.reranker_size == 0 and claimed >= cpus - 0.5 - 0.1  # search takes what the encoder leaves (claims rounded down)
        return
    assert pools.reranker_size >= 1 and pools.reranker_threads >= 1
    if gpus:
        assert pools.reranker_device == "cuda" and pools.reranker_size == gpus
        assert pools.encoder_gpus + pools.reranker_size * pools.reranker_gpus <= gpus
    else:
        assert pools.reranker_device == "cpu" and pools.encoder_gpus == pools.reranker_gpus == 0
        assert pools.search.claimed_cpus <= 0.5 * (cpus - 0.75)  # CPU cross-encoders get most of the CPUs


@pytest.mark.parametrize("cpus", [2, 16, 64])
@pytest.mark.parametrize("shards", [1, 4, 12])
def test_search_scales_out_with_the_cluster(cpus, shards):
    """Without a reranker: more CPUs, more shard actors (one per shard) and then replicas of them."""
    pools = plan_query_pools(cpus, 0, shards, RerankConfig(model="none"), sparse_shards=shards)
    search = pools.search
    actors = len(search.groups) * search.replicas
    assert actors >= min(shards, 4)  # 2 CPUs: four actors of a quarter CPU at most, several shards each
    if cpus >= 16:
        assert len(search.groups) == shards
        assert search.replicas == int((cpus - 0.75) // (shards + 0.1))
    smaller = plan_query_pools(cpus // 2, 0, shards, RerankConfig(model="none"), sparse_shards=shards).search
    assert len(smaller.groups) * smaller.replicas <= actors


def test_sparse_only_queries_need_no_encoder():
    pools = plan_query_pools(16, 1, 0, RerankConfig(model="none"), sparse_shards=3)
    assert pools.encoder_cpus == pools.encoder_gpus == 0 and all(not dense for dense, _ in pools.search.groups)


@pytest.mark.parametrize(
    "name, config_class",
    [("build_index.yaml", "pipelines.indexing:BuildIndexConfig"), ("retrieve_rerank.yaml", "pipelines.retrieval:RetrieveRerankConfig")],
)
def test_the_example_configs_load_into_their_jobs_settings(name, config_class, tmp_path):
    import importlib

    module, _, class_name = config_class.partition(":")
    config = getattr(importlib.import_module(module), class_name)()
    load_yaml_config(config, CONFIGS / name)
    # The examples leave the inputs and outputs to flags; give them files that exist, then every setting must validate.
    for setting in ("corpus", "queries", "index", "output"):
        if hasattr(config, setting):
            (tmp_path / setting).write_text("")
            setattr(config, setting, str(tmp_path / setting))
    validate_config(config)


def test_every_example_config_is_tested():
    # build_index.yaml and retrieve_rerank.yaml above; reindex.yaml in tests/jobs/test_deploy_manifests.py;
    # runtime_env.yaml (a Ray runtime environment, not job settings) in tests/jobs/test_job_submission.py.
    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == ["build_index.yaml", "reindex.yaml", "retrieve_rerank.yaml", "runtime_env.yaml"]
