"""connection.py imports pika without the package ``__init__``s that bring its other adapters.

Each check runs in a fresh python (this one imported all of pika long ago). That a running
daemon, under either runner, never loads the other adapters is tests/test_idle_imports.py's.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

from tests.support.daemonproc import ROOT, env_for

OTHER_ADAPTERS = ("pika.adapters.blocking_connection", "pika.adapters.select_connection", "pika.adapters.asyncio_connection")


def run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_for(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_the_daemons_pika_is_bare_until_a_callback_asks_for_the_rest() -> None:
    out = run(f"""
import logging, sys
import amqp_consumer.connection
print(sum(m in sys.modules for m in {OTHER_ADAPTERS!r}))
import pika
print(pika.__version__, len(logging.getLogger("pika").handlers))
print(pika.BlockingConnection.__name__, sum(m in sys.modules for m in {OTHER_ADAPTERS!r}))
print(all(hasattr(pika, n) for n in pika.__all__), all(hasattr(pika.adapters, n) for n in pika.adapters.__all__))
print(hasattr(pika, "not_in_pika"), hasattr(pika, "not.a.name"))
from pika.adapters import SelectConnection
print(SelectConnection.__module__, len(logging.getLogger("pika").handlers))
""")
    assert out == [
        "0",
        version("pika"), "1",  # what pika's __init__ sets first: the broker sees the version
        "BlockingConnection", "3",
        "True", "True",
        "False", "False",  # what pika lacks is an AttributeError, as ever
        "pika.adapters.select_connection", "2",  # pika's own NullHandler beside ours
    ]


def test_a_pika_the_callback_module_imported_first_is_left_alone() -> None:
    out = run(f"""
import sys
import pika
import amqp_consumer.connection
print("__getattr__" in vars(pika), sum(m in sys.modules for m in {OTHER_ADAPTERS!r}))
""")
    assert out == ["False", "3"]


def test_a_pika_without_readable_source_is_imported_as_usual() -> None:
    # No source, no __version__ to read: the ordinary import, adapters and all.
    out = run(f"""
import sys
from importlib.machinery import SourceFileLoader
SourceFileLoader.get_source = lambda self, name: None
import amqp_consumer.connection, pika
print("__getattr__" in vars(pika), sum(m in sys.modules for m in {OTHER_ADAPTERS!r}), pika.__version__)
""")
    assert out == ["False", "3", version("pika")]


def test_threads_asking_at_once_run_pikas_init_once() -> None:
    # A callback pool's threads may all reach for pika.BasicProperties on their first message.
    out = run("""
import logging, threading
import amqp_consumer.connection, pika
start = threading.Barrier(8)
found = []
def ask():
    start.wait()
    found.append(pika.BasicProperties.__name__)
threads = [threading.Thread(target=ask) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(len(found), set(found) == {"BasicProperties"}, len(logging.getLogger("pika").handlers))
""")
    assert out == ["8", "True", "2"]


def test_a_name_pika_lacks_is_an_attribute_error_before_the_rest_is_loaded_too() -> None:
    out = run("""
import amqp_consumer.connection, pika
print(hasattr(pika, "not.a.name"), hasattr(pika, "not_in_pika"), hasattr(pika.adapters, "nor_here"))
""")
    assert out == ["False", "False", "False"]
