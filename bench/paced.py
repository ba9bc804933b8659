"""A paced HTTP/1.1 load: a fixed request rate over a few keep-alive connections.

wrk (4.x) only runs as fast as it can, which measures throughput; latency at a modest,
steady rate needs a client that sends on a schedule. This one sends `GET /` at `--rate`
requests per second in all, spread evenly over `--connections` keep-alive connections
(each one sends on its own schedule, offset from the others), for `--seconds`, and prints
one JSON object: the rate achieved, latency percentiles in milliseconds, and errors.

    .venv/bin/python bench/paced.py --port 8080 --rate 1000 --seconds 10 --connections 4

A request's latency runs from writing it to reading the last byte of its response. The
sends follow a fixed timetable (request k of a connection is due at start + offset +
k * interval), so a slow response delays the next send instead of lowering the rate
silently: such late sends are counted (`late`), and with any of them the percentiles
understate what a client on that timetable would have seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

HOST = "127.0.0.1"
# a run never outlasts its duration by more than this, whatever the server does
GRACE = 10.0


@dataclass
class Paced:
    target_rate: float
    connections: int
    requests: int
    seconds: float
    rate: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    # sends more than one interval behind their schedule
    late: int
    errors: int
    error_examples: list[str] = field(default_factory=list)


def percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank percentile of an ascending list (None if empty)."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Connection:
    """One keep-alive connection sending on its own timetable."""

    def __init__(self, port: int, interval: float, offset: float) -> None:
        self.port = port
        self.interval = interval
        self.offset = offset
        self.latencies: list[float] = []
        self.late = 0
        self.errors: list[str] = []
        self.request = f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()

    async def run(self, start: float, until: float) -> None:
        reader, writer = await asyncio.open_connection(HOST, self.port)
        try:
            k = 0
            while True:
                due = start + self.offset + k * self.interval
                if due >= until:
                    return
                k += 1
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif -wait > self.interval:
                    self.late += 1
                sent = time.monotonic()
                writer.write(self.request)
                try:
                    await self.response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    # the connection's framing is lost: start a new one
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, self.port)
                    continue
                self.latencies.append(time.monotonic() - sent)
        finally:
            writer.close()

    @staticmethod
    async def response(reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, _, fields = head.partition(b"\r\n")
        if not status_line.startswith(b"HTTP/1.1 200 "):
            raise ValueError(f"status {status_line[:40]!r}")
        length = None
        for line in fields.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if length is None:
            raise ValueError("response without Content-Length")
        await reader.readexactly(length)


async def paced(port: int, rate: float, seconds: float, connections: int) -> Paced:
    interval = connections / rate
    conns = [Connection(port, interval, i * interval / connections) for i in range(connections)]
    start = time.monotonic() + 0.05
    until = start + seconds
    runs = [asyncio.create_task(c.run(start, until)) for c in conns]
    done, pending = await asyncio.wait(runs, timeout=seconds + GRACE)
    for task in pending:
        task.cancel()
    elapsed = time.monotonic() - start
    errors = [e for c in conns for e in c.errors]
    for task in done:
        if task.exception() is not None:
            errors.append(f"{type(task.exception()).__name__}: {task.exception()}")
    if pending:
        errors.append(f"{len(pending)} connections still busy {GRACE:g} s after the end")
    latencies = sorted(x * 1e3 for c in conns for x in c.latencies)
    return Paced(
        target_rate=rate,
        connections=connections,
        requests=len(latencies),
        seconds=round(min(elapsed, seconds + GRACE), 3),
        rate=len(latencies) / seconds,
        p50_ms=percentile(latencies, 0.50),
        p90_ms=percentile(latencies, 0.90),
        p99_ms=percentile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else None,
        late=sum(c.late for c in conns),
        errors=len(errors),
        error_examples=errors[:3],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help=f"port on {HOST} to load")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests/s in all (1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long (10)")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive connections (4)")
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 20000 or not 0 < args.seconds <= 120 or args.connections < 1:
        parser.error("keep --rate in (0, 20000], --seconds in (0, 120], --connections >= 1")
    if args.connections > args.rate * args.seconds:
        parser.error("fewer connections than requests, please")
    result = asyncio.run(paced(args.port, args.rate, args.seconds, args.connections))
    json.dump(asdict(result), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
