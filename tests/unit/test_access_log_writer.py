"""Access log writers: one per backend shared by every chain that names it and kept across
reloads, bounded queues whose drops are counted per backend, inbound sinks that log only
the callers they name, and a TCP collector that is down, then back (a real socket)."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from meshling.snapshot.model import AccessLog, AccessLogBackend
from meshling.telemetry.accesslog import AccessLogWriters, FileWriter, TcpWriter
from meshling.telemetry.metrics import Metrics

WEB = b"spiffe://default/web"


def record(n: int) -> tuple[object, ...]:
    return (
        1700000000.0 + n, 0.001, "in", "all", "up", None, b"127.0.0.1", None, 200, n, 0,
        None, b"r%d" % n, None, "", "inbound", "api",
    )  # fmt: skip


def sink(backend: AccessLogBackend, *identities: str) -> AccessLog:
    fields = (("bytes_received", None),)
    return AccessLog(backend, "json", fields, identities=identities or ("*",))


def test_access_log_writer_is_shared_by_backend_and_kept_across_reloads(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    backend = AccessLogBackend("file", str(path))

    async def run() -> None:
        writers = AccessLogWriters(Metrics())
        first = writers.chain([sink(backend)])
        text = AccessLog(backend, "text", template="%BYTES_RECEIVED%")
        second = writers.chain([text])
        assert first is not None and second is not None
        assert first.sinks[0][0] is second.sinks[0][0]
        writer = first.sinks[0][0]
        assert isinstance(writer, FileWriter)
        first.log(record(1))
        second.log(record(2))
        # a reload that keeps the backend keeps the writer, its queue and its file
        writers.retain([backend])
        assert writers.writer(backend) is writer and len(writer.pending) == 2
        # a reload that drops it writes what it holds and closes it
        writers.retain([])
        assert writer.closed and not writers.writers
        assert writers.chain([]) is None

    asyncio.run(run())
    assert [line for line in path.read_text().splitlines()] == ['{"bytes_received":1}', "2"]


def test_access_log_writer_inbound_sinks_log_only_the_callers_they_name(tmp_path: Path) -> None:
    named, anyone = AccessLogBackend("file", str(tmp_path / "web")), AccessLogBackend("stdout")

    async def run() -> None:
        writers = AccessLogWriters(Metrics())
        logs = writers.chain([sink(named, WEB.decode()), sink(anyone)])
        assert logs is not None
        logs.log(record(1), WEB)
        logs.log(record(2), b"spiffe://default/batch")
        logs.log(record(3), None)
        assert [len(w.pending) for w, _, _ in logs.sinks] == [1, 3]
        for writer, _, _ in logs.sinks:
            writer.pending.clear()
        writers.close()

    asyncio.run(run())


def test_access_log_writer_drops_past_the_bound_and_counts_by_backend(tmp_path: Path) -> None:
    backend = AccessLogBackend("file", str(tmp_path / "b.log"), max_pending=4)
    metrics = Metrics()

    async def run() -> None:
        writers = AccessLogWriters(metrics)
        logs = writers.chain([sink(backend)])
        assert logs is not None
        for n in range(10):  # no flush can run in between: the loop is not yielded to
            logs.log(record(n))
        writers.close()

    asyncio.run(run())
    assert metrics.access_log_dropped == {f"file:{tmp_path / 'b.log'}": 6}
    assert len((tmp_path / "b.log").read_text().splitlines()) == 4


def test_access_log_writer_tcp_queues_while_down_then_delivers_after_reconnecting() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = AccessLogBackend("tcp", host="127.0.0.1", port=port, max_pending=4)
    metrics = Metrics()
    received: list[bytes] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        writers = AccessLogWriters(metrics)
        logs = writers.chain([sink(backend)])
        assert logs is not None
        writer = writers.writer(backend)
        assert isinstance(writer, TcpWriter)
        for n in range(10):
            logs.log(record(n))
        await asyncio.sleep(0.3)  # nothing listens: connection attempts fail meanwhile
        assert writer.collector is None and len(writer.pending) == 4
        got = asyncio.Event()

        async def collect(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                received.append(line)
                if len(received) == 5:
                    got.set()

        server = await asyncio.start_server(collect, "127.0.0.1", port)
        deadline = loop.time() + 10
        while writer.collector is None and loop.time() < deadline:
            await asyncio.sleep(0.02)
        logs.log(record(99))
        await asyncio.wait_for(got.wait(), 10)
        writers.close()
        server.close()
        await server.wait_closed()

    asyncio.run(run())
    assert [json.loads(line)["bytes_received"] for line in received] == [0, 1, 2, 3, 99]
    assert metrics.access_log_dropped == {f"tcp:127.0.0.1:{port}": 6}
