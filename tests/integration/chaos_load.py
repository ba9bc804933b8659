"""The chaos suite's client app: idempotent GETs at a steady rate, each outcome recorded.

Run in the client host, it calls its proxy's outbound (`127.0.0.1:15001`) like any app
that knows nothing of the mesh: `--rps` requests a second, each started on schedule
(open loop, so a slow answer does not slow the traffic down and hide a fault), until
SIGTERM or at most `--duration` seconds, over a pool of keep-alive connections. It then
waits for the requests in flight and writes `--out`, a JSON list with one entry per
request: `[sent_at (wall clock), latency seconds, status or 0, error]`. Every request has
`--timeout`; the whole run ends by duration + timeout + 5 s.

    python tests/integration/chaos_load.py --port 15001 --rps 150 --duration 60 --out r.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import uvloop

from meshling.demo.client import ClientError, HttpClient

Record = tuple[float, float, int, str]


async def _one(client: HttpClient, records: list[Record]) -> None:
    sent = time.time()
    began = time.perf_counter()
    try:
        response = await client.get("/")
    except ClientError as exc:
        records.append((sent, time.perf_counter() - began, 0, str(exc)))
        return
    error = "" if response.status == 200 else response.body[:200].decode("utf-8", "replace")
    records.append((sent, time.perf_counter() - began, response.status, error))


async def generate(port: int, rps: float, duration: float, timeout: float) -> list[Record]:
    client = HttpClient("127.0.0.1", port, timeout=timeout, max_idle=256)
    loop = asyncio.get_running_loop()
    records: list[Record] = []
    tasks: set[asyncio.Task[None]] = set()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    start = loop.time()
    total = int(rps * duration)
    for n in range(total):
        delay = start + n / rps - loop.time()
        if delay > 0:
            # a pause that SIGTERM cuts short
            await asyncio.wait([stopped], timeout=delay)
        if stop.is_set():
            break
        task = asyncio.create_task(_one(client, records))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        # every request is bounded by `timeout`; this bounds the whole in case one is not
        await asyncio.wait(tasks, timeout=timeout + 5.0)
    stopped.cancel()
    for task in list(tasks):
        task.cancel()
    await client.close()
    return records


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chaos_load", description=__doc__)
    parser.add_argument("--port", type=int, default=15001)
    parser.add_argument("--rps", type=float, default=150.0)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    records = uvloop.run(generate(args.port, args.rps, args.duration, args.timeout))
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(records))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
