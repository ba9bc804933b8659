"""Access log formatting: every field is valid JSON, escaped, and only the chosen ones."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from meshling.http1 import RequestDecoder
from meshling.snapshot.load import ACCESS_LOG_FIELDS
from meshling.snapshot.model import AccessLog, AccessLogBackend, Endpoint
from meshling.telemetry.accesslog import AccessLogWriter
from meshling.telemetry.metrics import Metrics


def record(path: bytes, agent: bytes) -> tuple[object, ...]:
    head = RequestDecoder().feed(
        b"GET " + path + b" HTTP/1.1\r\nHost: api.local\r\nUser-Agent: " + agent + b"\r\n\r\n"
    )[0]
    return (
        1700000000.25,
        0.0123456,
        "in",
        "all",
        "up",
        Endpoint("127.0.0.1", 8080),
        b"127.0.0.1",
        head,
        200,
        0,
        17,
        None,
        b"rid-1",
        None,
        "",
        "outbound",
        "web",
    )


def write(
    tmp_path: Path, fields: tuple[str, ...], *records: tuple[object, ...]
) -> list[dict[str, object]]:
    log = tmp_path / "access.log"

    async def run() -> None:
        named = tuple((f, None) for f in fields)
        sink = AccessLog(AccessLogBackend("file", str(log)), "json", named)
        writer = AccessLogWriter(sink, Metrics())
        for r in records:
            writer.log(r)
        writer.close()

    asyncio.run(run())
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_accesslog_all_fields_are_json(tmp_path: Path) -> None:
    (entry,) = write(tmp_path, ACCESS_LOG_FIELDS, record(b"/a?b=1", b'evil"\\agent'))
    assert set(entry) == set(ACCESS_LOG_FIELDS)
    assert entry["start_time"] == 1700000000.25
    assert entry["duration_ms"] == 12.346
    assert entry["upstream"] == "127.0.0.1:8080"
    assert entry["method"] == "GET" and entry["path"] == "/a?b=1"
    assert entry["authority"] == "api.local" and entry["protocol"] == "HTTP/1.1"
    assert entry["user_agent"] == 'evil"\\agent'
    assert entry["request_id"] == "rid-1" and entry["error"] is None
    assert entry["status"] == 200 and entry["bytes_sent"] == 17


def test_accesslog_only_chosen_fields_in_order(tmp_path: Path) -> None:
    entries = write(tmp_path, ("status", "path"), record(b"/x", b"a"), record(b"/y", b"b"))
    assert entries == [{"status": 200, "path": "/x"}, {"status": 200, "path": "/y"}]
    assert list(entries[0]) == ["status", "path"]
