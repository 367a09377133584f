"""RabbitMQ 4.3 nodes in one cluster, and what rabbitmqctl says about a queue across it."""

from __future__ import annotations

import json
import secrets
import string
import threading
from pathlib import Path
from typing import Any

from tests.support.rabbit43 import Rabbit43Node
from tests.support.rabbitnode import RabbitNode, RabbitNodeError


class Cluster:
    """Nodes with their own names, ports and folders, one Erlang cookie, joined with ``rabbitmqctl join_cluster``."""

    def __init__(self, root: Path, size: int) -> None:
        cookie = "".join(secrets.choice(string.ascii_uppercase) for _ in range(20))
        self.nodes: list[RabbitNode] = [Rabbit43Node(f"cluster{i}", cookie=cookie, root=root) for i in range(1, size + 1)]

    def start(self) -> None:
        """Start every node (at once), then join the others to the first."""
        errors: list[BaseException] = []

        def start(node: RabbitNode) -> None:
            try:
                node.start(timeout=180)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=start, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.nodename)
            node.ctl("start_app")
        running = json.loads(first.ctl("cluster_status", "--formatter", "json").stdout)["running_nodes"]
        if sorted(running) != sorted(n.nodename for n in self.nodes):
            raise RabbitNodeError(f"the cluster has {running} running, not all of {[n.nodename for n in self.nodes]}")

    def version(self) -> str:
        return self.live().ctl("version").stdout.strip()

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def live(self) -> RabbitNode:
        for node in self.nodes:
            if node.is_running():
                return node
        raise RabbitNodeError("no node of the cluster is running")

    def query(self, *args: str) -> list[dict[str, Any]]:
        """A rabbitmqctl listing (cluster-wide) from a running node, as JSON rows."""
        out = self.live().ctl(*args, "-q", "--formatter", "json").stdout
        return json.loads(out or "[]")

    def node_named(self, nodename: str) -> RabbitNode:
        return next(n for n in self.nodes if n.nodename == nodename)

    def leader(self, queue: str) -> RabbitNode:
        rows = [r for r in self.query("list_queues", "name", "leader") if r["name"] == queue]
        if not rows:
            raise KeyError(f"no queue {queue!r} in the cluster")
        return self.node_named(rows[0]["leader"])

    def depth(self, queue: str) -> int:
        rows = [r for r in self.query("list_queues", "name", "messages") if r["name"] == queue]
        return int(rows[0]["messages"]) if rows else -1

    def consumers(self, queue: str) -> list[tuple[str, dict[str, Any]]]:
        """The consumers on *queue*: (connection_name of the connection holding it, its listing row)."""
        channels = {r["pid"]: r["connection"] for r in self.query("list_channels", "pid", "connection")}
        names = {}
        for row in self.query("list_connections", "pid", "client_properties"):
            names[row["pid"]] = {key: value for key, _kind, value in row["client_properties"]}.get("connection_name", "?")
        return [
            (names.get(channels.get(r["channel_pid"], ""), "?"), r)
            for r in self.query("list_consumers", "queue_name", "channel_pid", "activity_status")
            if r["queue_name"] == queue
        ]
