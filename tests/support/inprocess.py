"""Config for daemons built in the test process (Daemon(reactor, config, ...)), not as twistd."""

from __future__ import annotations

from pathlib import Path

from amqp_consumer.config import Config, load


def inprocess_config(tmp_path: Path, queue: str, url: str, arguments: str = "{}") -> Config:
    """One queue (with these TOML arguments) on the broker at `url` (the broker fixture's or a node's),
    quick reconnects, no health listener."""
    p = tmp_path / "c.toml"
    p.write_text(
        f"""
[amqp]
urls = ["{url}"]
reconnect_min_delay = 0.1
reconnect_max_delay = 1.0
[[queues]]
name = "{queue}"
arguments = {arguments}
[consumer]
callback = "x:y"
[health]
listen = ""
"""
    )
    return load(p)
