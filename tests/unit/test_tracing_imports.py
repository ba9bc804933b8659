"""Tracing costs nothing to a proxy that does not use it: without a `tracing:` section
neither the tracing code nor the OpenTelemetry SDK is imported, and with one the SDK is
imported only when the proxy compiles the snapshot, not when it is loaded."""

from __future__ import annotations

import subprocess
import sys

SNAPSHOT = """
import sys
from meshling.snapshot import from_dict
import meshling.proxy.server, meshling.proxy.http, meshling.proxy.http2
document = {
    "version": "1",
    "listeners": [{"name": "in", "port": 1, "filter_chains": [{"tcp": {"cluster": "up"}}]}],
    "clusters": [{"name": "up", "endpoints": [{"address": "127.0.0.1", "port": 2}]}],
}
TRACING
snapshot = from_dict(document)
def loaded(prefix):
    return any(m == prefix or m.startswith(prefix + ".") for m in sys.modules)
print(loaded("meshling.tracing"), loaded("opentelemetry"), loaded("meshling.telemetry.otlp"))
"""


def run(tracing: str) -> str:
    code = SNAPSHOT.replace("TRACING", tracing)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_tracing_off_imports_nothing_of_it() -> None:
    assert run("") == "False False False"


def test_tracing_section_loads_the_parser_but_not_the_sdk() -> None:
    section = 'document["tracing"] = {"endpoint": "http://127.0.0.1:4318", "sampling": 1}'
    assert run(section) == "True False False"
