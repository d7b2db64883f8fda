"""Run jobs.build_index on a two-node local Ray cluster; used by tests/test_build_index_job.py.

It runs in its own process so that its cluster does not collide with the test session's Ray.
Usage: python tests/two_node_build.py OUTPUT.json BUILD_INDEX_FLAGS...
Writes the job summary and the number of live nodes to OUTPUT.json.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

NODE_RESOURCES = {"num_cpus": 1, "object_store_memory": 200 * 1024 * 1024}


def main(output: str, flags: list[str]) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={**NODE_RESOURCES, "include_dashboard": False})
    cluster.add_node(**NODE_RESOURCES)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        from jobs.build_index import main as build_index

        summary = build_index(flags)
        nodes = sum(1 for node in ray.nodes() if node["Alive"])
        with open(output, "w") as handle:
            json.dump({"summary": summary, "nodes": nodes}, handle)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
