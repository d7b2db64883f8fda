"""deploy/: the KubeRay manifests of the nightly reindex carry the fields KubeRay requires, and run the job the README documents."""

from __future__ import annotations

import shlex

import yaml
from conftest import REPOSITORY

DEPLOY = REPOSITORY / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def check_rayjob_spec(spec: dict) -> None:
    """What KubeRay's RayJob needs (ray.io/v1): an entrypoint, and a cluster to run it on (rayClusterSpec with a head group)."""
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    containers = head["template"]["spec"]["containers"]
    assert containers and all(container["name"] and container["image"] for container in containers)
    for group in cluster.get("workerGroupSpecs", []):
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", group.get("replicas", 0))
        assert all(container["name"] and container["image"] for container in group["template"]["spec"]["containers"])
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    # The entrypoint runs the nightly job with the recipe's settings; the config path exists in the repository.
    words = shlex.split(spec["entrypoint"])
    assert words[:3] == ["python", "-m", "jobs.build_index"]
    config = words[words.index("--config") + 1]
    assert (REPOSITORY / config).is_file()
    assert "--corpus" in words and "--index" in words


def test_the_rayjob_manifest_has_kuberays_required_fields():
    job = load("rayjob-reindex.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob") and job["metadata"]["name"]
    check_rayjob_spec(job["spec"])
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_the_raycronjob_runs_the_same_rayjob_every_night():
    cron = load("raycronjob-reindex.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob") and cron["metadata"]["name"]
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5 and all(field.replace("*", "0").replace("/", "").replace(",", "").replace("-", "").isdigit() for field in fields)
    assert set(cron["spec"]) <= {"schedule", "jobTemplate", "suspend", "timeZone"}  # the fields KubeRay 1.6/1.7 define
    check_rayjob_spec(cron["spec"]["jobTemplate"])
    assert cron["spec"]["jobTemplate"] == load("rayjob-reindex.yaml")["spec"]


def test_the_recipe_config_loads_into_build_index_settings(tmp_path):
    from pipelines.config import load_yaml_config, validate_config
    from pipelines.indexing import BuildIndexConfig

    config = BuildIndexConfig()
    load_yaml_config(config, REPOSITORY / "jobs" / "configs" / "reindex.yaml")
    (tmp_path / "corpus.jsonl").write_text("")
    config.corpus, config.index = str(tmp_path / "corpus.jsonl"), str(tmp_path / "index")
    validate_config(config)
    assert (config.keep, config.unchanged_status) == (7, 3)
