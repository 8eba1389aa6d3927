"""The local Kafka cluster's layout: ports, data dirs and each node's properties."""

from __future__ import annotations

from pathlib import Path

from aipipe import services
from aipipe.infra.topics import min_insync_replicas


def properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines()
                if line and not line.startswith("#"))


def test_three_nodes_have_their_own_ports_and_data_dirs(tmp_path: Path) -> None:
    nodes = services.cluster_nodes("127.0.0.1", 29092, 3, tmp_path)
    assert [(n.node_id, n.port, n.controller_port) for n in nodes] == [
        (1, 29092, 29093), (2, 29094, 29095), (3, 29096, 29097)]
    assert services.cluster_bootstrap(nodes) == "127.0.0.1:29092,127.0.0.1:29094,127.0.0.1:29096"
    assert len({n.path for n in nodes}) == 3
    props = properties(services.cluster_properties(nodes[1], nodes))
    assert props["node.id"] == "2"
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == (
        "1@127.0.0.1:29093,2@127.0.0.1:29095,3@127.0.0.1:29097")
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29094,CONTROLLER://127.0.0.1:29095"
    assert props["log.dirs"] == str(tmp_path / "kafka-cluster" / "node-2" / "data")
    assert props["default.replication.factor"] == props["offsets.topic.replication.factor"] == "3"
    assert props["min.insync.replicas"] == props["transaction.state.log.min.isr"] == "2"


def test_two_of_three_replicas_must_have_a_write() -> None:
    assert [min_insync_replicas(n) for n in (1, 2, 3, 5)] == [1, 1, 2, 2]
