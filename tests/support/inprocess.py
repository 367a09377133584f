"""Config for daemons built in the test process (Daemon(reactor, config, ...)), not as twistd."""

from __future__ import annotations

from pathlib import Path

from amqp_consumer.config import Config, load


def inprocess_config(tmp_path: Path, queue: str, url: str | None = None, arguments: str = "{}") -> Config:
    """One queue (with these TOML arguments) on the broker at url (default: the one on 5672),
    quick reconnects, no health listener."""
    p = tmp_path / "c.toml"
    urls = f'urls = ["{url}"]' if url else ""
    p.write_text(
        f"""
[amqp]
{urls}
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
