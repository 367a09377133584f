"""connection.py imports pika without the parts the daemon never uses: the package ``__init__``s that
bring its other adapters, their socket plumbing, and pika.data's decimal module.

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


def test_the_adapters_one_check_is_pikas_own_and_the_rest_of_its_module_loads_when_asked_for() -> None:
    # io_services_utils is the other adapters' socket and TLS plumbing; the Twisted adapter
    # takes check_callback_arg from it, compiled alone from pika's source at its own lines.
    out = run("""
import inspect, sys
import amqp_consumer.connection
io = sys.modules["pika.adapters.utils.io_services_utils"]
import pika.adapters.utils
print("pika.diagnostic_utils" in sys.modules, "SocketConnectionMixin" in vars(io), pika.adapters.utils.io_services_utils is io)
check = io.check_callback_arg
print(check.__module__, check.__code__.co_filename == io.__file__)
print(inspect.getsourcelines(check)[0][0].strip() == "def check_callback_arg(callback: Any, name: str) -> None:")
try:
    check(None, "on_done")
except TypeError as e:
    print(str(e).replace(" ", "_"))
print(io.SocketConnectionMixin.__name__, "pika.diagnostic_utils" in sys.modules)
from pika.adapters.asyncio_connection import AsyncioConnection
print(AsyncioConnection.__name__, hasattr(io, "not_in_pika"))
""")
    assert out == [
        "False", "False", "True",
        "pika.adapters.utils.io_services_utils", "True",
        "True",
        "on_done_must_be_callable,_but_got_None",
        "SocketConnectionMixin", "True",
        "AsyncioConnection", "False",
    ]


def test_a_check_pika_no_longer_defines_gets_the_ordinary_import() -> None:
    out = run("""
import sys
from importlib.machinery import SourceFileLoader
real = SourceFileLoader.get_source
SourceFileLoader.get_source = lambda self, name: (
    real(self, name).replace("def check_callback_arg(", "def renamed(") if name.endswith("io_services_utils") else real(self, name))
import amqp_consumer.connection
print("SocketConnectionMixin" in vars(sys.modules["pika.adapters.utils.io_services_utils"]))
""")
    assert out == ["True"]


def test_pika_data_does_without_decimal_until_a_message_carries_one() -> None:
    out = run("""
import sys
import amqp_consumer.connection, pika.data
print("decimal" in sys.modules)
pieces = []
pika.data.encode_table(pieces, {"s": "x", "n": 7, "t": True, "f": {"l": [1]}, "none": None})
print("decimal" in sys.modules)
# Only pika.data ever saw the stand-in.
stand_in = amqp_consumer.connection._DECIMAL_STAND_IN
print([name for name, m in list(sys.modules.items()) if m is not None and vars(m).get("decimal") is stand_in])
# A header of the decimal type, as a publisher's Decimal("1.25") arrives: 2 decimals, 125.
value, _ = pika.data.decode_table(bytes.fromhex("00000008") + b"\\x01dD" + bytes.fromhex("020000007d"), 0)
print(repr(value["d"]), "decimal" in sys.modules, pika.data.decimal is sys.modules["decimal"])
pieces = []
pika.data.encode_table(pieces, value)
print(pika.data.decode_table(b"".join(pieces), 0)[0] == value)
""")
    assert out == ["False", "False", "['pika.data']", "Decimal('1.25')", "True", "True", "True"]


def test_whatever_else_is_asked_of_pika_datas_decimal_is_the_real_modules() -> None:
    out = run("""
import sys
import amqp_consumer.connection, pika.data
print("decimal" in sys.modules, pika.data.decimal.ROUND_HALF_EVEN, pika.data.decimal is sys.modules["decimal"])
""")
    assert out == ["False", "ROUND_HALF_EVEN", "True"]


def test_a_decimal_imported_first_is_pika_datas_own() -> None:
    out = run("""
import decimal
import amqp_consumer.connection, pika.data
pieces = []
pika.data.encode_table(pieces, {"d": decimal.Decimal("-0.5")})
print(pika.data.decimal is decimal, pika.data.decode_table(b"".join(pieces), 0)[0])
""")
    assert out == ["True", "{'d':", "Decimal('-0.5')}"]


def test_a_decimal_a_callback_imports_later_is_encoded_as_one() -> None:
    # The callback imports decimal after the daemon started, then publishes a Decimal header.
    out = run("""
import amqp_consumer.connection, pika.data
import decimal
pieces = []
pika.data.encode_table(pieces, {"d": decimal.Decimal("3.14")})
print(pika.data.decode_table(b"".join(pieces), 0)[0]["d"])
""")
    assert out == ["3.14"]
