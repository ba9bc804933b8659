"""A worker of the control-plane benchmark (`bench/cp.py`): many simulated proxies in one
process, each a WebSocket client of the config stream.

    .venv/bin/python bench/cp_client.py SPEC.json

SPEC.json (written by bench/cp.py) holds the stream URL, the client settings and the
dataplanes this worker plays: their Dataplane documents, dataplane tokens and TLS paths.
Each simulated proxy connects, sends its hello, and answers every push with an ack at
once, as a proxy whose snapshot always applies would. It does not parse or run the
snapshot: the benchmark measures the control plane, and a light client keeps this
process from being the bottleneck. Every timestamp is `time.monotonic()`, which is one
clock for every process of the host, so bench/cp.py can compare them with its own.

The worker is driven over stdin/stdout, one JSON object a line:

stdin (commands)
    {"cmd": "arm", "round": K, "marker": M}  from now on, the first push whose text
                                             contains M is round K's; answered `armed`
    {"cmd": "collect", "round": K}           answered `report`
    {"cmd": "status"}                        answered `status` (pushes received so far)
    {"cmd": "stop"}                          close every stream; answered `stopped`
stdout (events)
    ready     every proxy has acked its first push, or failed (counts, errors)
    progress  connect-phase counts, every second until ready
    done      every proxy has acked a push carrying the armed marker
    armed / report / status / stopped   the answers above
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import sys
import time
from typing import Any

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

# what the control plane's encoder puts first; anything else falls back to json.loads
_PUSH_HEAD = re.compile(r'^\{"type":\s*"push",\s*"version":\s*"([^"]+)"')


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Proxy:
    """One simulated proxy: a stream, its hello, and the acks it sends."""

    def __init__(self, worker: Worker, entry: dict[str, Any]) -> None:
        self.worker = worker
        self.name: str = entry["dataplane"]["metadata"]["name"]
        self.token: str = entry["token"]
        self.hello = json.dumps(
            {
                "type": "hello",
                "protocol": 1,
                "dataplane": entry["dataplane"],
                "applied": None,
                "tls_paths": entry["tls_paths"],
                "proxy": {"version": "bench", "simulated": True},
            },
            separators=(",", ":"),
        )
        self.first_ack: float | None = None
        self.first_size = 0
        self.last_size = 0
        self.pushes = 0
        self.error: str | None = None
        self.extensions: list[str] = []
        # the armed round: its marker, and (receive, ack-sent) of the push that carried it
        self.marker: str | None = None
        self.hit: tuple[float, float] | None = None
        self.pushes_since_arm = 0

    def arm(self, marker: str) -> None:
        self.marker, self.hit, self.pushes_since_arm = marker, None, 0

    async def run(self, handshakes: asyncio.Semaphore) -> None:
        settings = self.worker.settings
        try:
            async with handshakes:
                ws = await connect(
                    self.worker.url,
                    additional_headers={"Authorization": f"Bearer {self.token}"},
                    compression="deflate" if settings["compression"] else None,
                    max_size=settings["max_message_bytes"],
                    open_timeout=settings["open_timeout"],
                    # the agent's settings (meshling.agent.agent)
                    ping_interval=settings["ping_interval"],
                    ping_timeout=settings["ping_timeout"],
                    proxy=None,
                    user_agent_header="meshling-bench",
                )
                self.extensions = [e.name for e in ws.protocol.extensions]
                await ws.send(self.hello)
            self.worker.connected += 1
            await self.serve(ws)
        except InvalidStatus as e:
            body = e.response.body.decode(errors="replace")[:300] if e.response.body else ""
            self.fail(f"handshake refused: HTTP {e.response.status_code} {body}".strip())
        except (InvalidHandshake, OSError, TimeoutError) as e:
            self.fail(f"cannot connect: {type(e).__name__}: {e}")
        except ConnectionClosed as e:
            if not self.worker.stopping:
                self.fail(f"stream closed: {e}")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must show, not hang the benchmark
            self.fail(f"{type(e).__name__}: {e}")

    async def serve(self, ws: ClientConnection) -> None:
        self.worker.streams.append(ws)
        async for text in ws:
            received = time.monotonic()
            if isinstance(text, bytes):
                text = text.decode()
            match = _PUSH_HEAD.match(text)
            if match:
                version = match.group(1)
            else:
                message = json.loads(text)
                if message.get("type") == "refuse":
                    self.fail(f"refused: {message.get('reason')}: {message.get('message')}")
                    await ws.close()
                    return
                if message.get("type") != "push":
                    self.fail(f"unexpected message type {message.get('type')!r}")
                    continue
                version = str(message["version"])
            await ws.send(f'{{"type":"ack","version":"{version}"}}')
            acked = time.monotonic()
            self.pushes += 1
            self.last_size = len(text)
            if self.first_ack is None:
                self.first_ack = acked
                self.first_size = len(text)
                self.worker.settled()
            if self.marker is not None:
                self.pushes_since_arm += 1
                if self.hit is None and self.marker in text:
                    self.hit = (received, acked)
                    self.worker.hit()
        if not self.worker.stopping:
            self.fail(f"stream closed by the control plane: code {ws.close_code} {ws.close_reason}")

    def fail(self, error: str) -> None:
        if self.error is None:
            self.error = error
            self.worker.failed(self)


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.url: str = spec["url"]
        self.settings: dict[str, Any] = spec["settings"]
        self.proxies = [Proxy(self, entry) for entry in spec["dataplanes"]]
        self.streams: list[ClientConnection] = []
        self.connected = 0
        self.acked = 0
        self.errors: list[str] = []
        self.ready_sent = False
        self.round: int | None = None
        self.hits = 0
        self.done_sent = False
        self.cpu_at_arm = 0.0
        self.stopping = False

    def emit(self, event: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()

    def settled(self) -> None:
        self.acked += 1
        self.check_ready()

    def failed(self, proxy: Proxy) -> None:
        self.errors.append(f"{proxy.name}: {proxy.error}")
        self.check_ready()

    def check_ready(self) -> None:
        if not self.ready_sent and self.acked + len(self.errors) >= len(self.proxies):
            self.ready_sent = True
            self.emit_ready()

    def emit_ready(self) -> None:
        firsts = [p.first_ack for p in self.proxies if p.first_ack is not None]
        sizes = [p.first_size for p in self.proxies if p.first_ack is not None]
        self.emit(
            "ready",
            proxies=len(self.proxies),
            acked=self.acked,
            errors=self.errors[:20],
            failed=len(self.errors),
            last_first_ack=max(firsts, default=None),
            snapshot_bytes=sizes,
            extensions=next((p.extensions for p in self.proxies if p.extensions), []),
        )

    def hit(self) -> None:
        self.hits += 1
        if not self.done_sent and self.hits >= len(self.proxies):
            self.done_sent = True
            self.emit("done", round=self.round)

    def arm(self, number: int, marker: str) -> None:
        self.round, self.hits, self.done_sent = number, 0, False
        for proxy in self.proxies:
            proxy.arm(marker)
        self.cpu_at_arm = time.process_time()
        self.emit("armed", round=number)

    def report(self, number: int) -> None:
        hits = [p for p in self.proxies if p.hit is not None]
        self.emit(
            "report",
            round=number,
            received=[p.hit[0] for p in hits if p.hit],
            acked=[p.hit[1] for p in hits if p.hit],
            missing=[p.name for p in self.proxies if p.hit is None],
            pushes=sum(p.pushes_since_arm for p in self.proxies),
            cpu_s=time.process_time() - self.cpu_at_arm,
            last_bytes=[p.last_size for p in hits],
            errors=self.errors[:20],
            failed=len(self.errors),
        )

    async def progress(self) -> None:
        while not self.ready_sent:
            await asyncio.sleep(1.0)
            if not self.ready_sent:
                self.emit(
                    "progress", connected=self.connected, acked=self.acked, failed=len(self.errors)
                )

    async def stop(self, tasks: list[asyncio.Task[None]]) -> None:
        self.stopping = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(ws.close() for ws in self.streams), return_exceptions=True), 10
            )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.emit("stopped", pushes=sum(p.pushes for p in self.proxies))


async def main(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    limit = raise_nofile_limit()
    worker = Worker(spec)
    if limit < len(worker.proxies) + 64:
        worker.emit("fatal", error=f"open-files limit {limit} is too low for this many streams")
        return 1
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    handshakes = asyncio.Semaphore(spec["settings"]["handshakes"])
    tasks = [asyncio.create_task(p.run(handshakes)) for p in worker.proxies]
    progress = asyncio.create_task(worker.progress())
    try:
        while line := await commands.readline():
            command = json.loads(line)
            if command["cmd"] == "arm":
                worker.arm(command["round"], command["marker"])
            elif command["cmd"] == "collect":
                worker.report(command["round"])
            elif command["cmd"] == "status":
                worker.emit("status", pushes=sum(p.pushes for p in worker.proxies))
            elif command["cmd"] == "stop":
                break
    finally:
        progress.cancel()
        await worker.stop(tasks)
    return 0


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sys.exit(runner.run(main(sys.argv[1])))
