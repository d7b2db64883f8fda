"""cluster.yaml: valid for Ray's cluster launcher, and its setup installs everything the jobs import."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPOSITORY = Path(__file__).resolve().parents[2]


def load_cluster_config() -> dict:
    return yaml.safe_load((REPOSITORY / "cluster.yaml").read_text())


def requirement_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement (``ray[data]>=2.51`` -> ``ray``)."""
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    filled = fillout_defaults(load_cluster_config())  # as `ray up` does before validating
    validate_config(filled)
    assert set(filled["available_node_types"]) == {"head", "gpu_worker"}
    assert filled["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1


def test_every_node_installs_the_project_with_its_cluster_extra_pinned():
    config = load_cluster_config()
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    assert "cluster" in project["optional-dependencies"] and any(requirement_name(r) == "ray" and "default" in r for r in project["optional-dependencies"]["cluster"])
    # The repository reaches every node, then each node type installs torch alone (its build), then the project.
    assert config["file_mounts"] == {"~/retrieval-pipelines": "."}
    for commands, torch_build in ((config["head_setup_commands"], "whl/cpu"), (config["worker_setup_commands"], None)):
        torch_step = next(index for index, command in enumerate(commands) if "torch==" in command)
        project_step = next(index for index, command in enumerate(commands) if "retrieval-pipelines[cluster]" in command)
        assert torch_step < project_step
        assert "-c ~/retrieval-pipelines/.ci/constraints.txt" in commands[project_step] and " -e " in commands[project_step]
        assert (torch_build in commands[torch_step]) if torch_build else ("--index-url" not in commands[torch_step])
    # Every runtime dependency (and the cluster extra) is pinned by the constraints file the nodes install with.
    pins = {requirement_name(line): line.split("==", 1)[1].strip() for line in (REPOSITORY / ".ci" / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    wanted = {requirement_name(requirement) for requirement in [*project["dependencies"], *project["optional-dependencies"]["cluster"]]}
    assert not wanted - set(pins), f"not pinned in .ci/constraints.txt: {sorted(wanted - set(pins))}"
    torch_pins = {re.search(r"torch==([\w.]+)", command).group(1) for command in config["head_setup_commands"] + config["worker_setup_commands"] if "torch==" in command}
    assert torch_pins == {pins["torch"]}
