"""The demo's traffic loop: GET requests at a steady rate into the mesh, counted.

Requests start on a fixed schedule (open loop), so a slow answer does not slow the
offered load down; a cap on requests still waiting keeps memory bounded if the mesh
stalls, and counts what it had to skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json

from meshling.demo.client import ClientError, HttpClient
from meshling.demo.summary import TrafficCounts

PATHS = ("/", "/catalog", "/users/42", "/orders?limit=5")


class TrafficLoop:
    def __init__(
        self,
        client: HttpClient,
        rps: float,
        counts: TrafficCounts,
        *,
        max_in_flight: int = 256,
        paths: tuple[str, ...] = PATHS,
    ) -> None:
        self.client = client
        self.rps = rps
        self.counts = counts
        self.max_in_flight = max_in_flight
        self.paths = paths
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event, finish_within: float = 5.0) -> None:
        """Send until `stop` is set, then give requests in flight `finish_within` seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        paths = itertools.cycle(self.paths)
        for sent in itertools.count():
            due = start + sent / self.rps
            delay = due - loop.time()
            if delay < -1.0:
                # the loop was starved (a paused terminal, say); resume the schedule from
                # now instead of bursting to catch up
                start, delay = loop.time() - sent / self.rps, 0.0
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
            if len(self._in_flight) >= self.max_in_flight:
                self.counts.skipped += 1
                continue
            task = asyncio.create_task(self._one(next(paths)))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        if self._in_flight:
            _, pending = await asyncio.wait(self._in_flight, timeout=finish_within)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self.counts.sent += 1
        began = loop.time()
        try:
            response = await self.client.get(path, {"host": "web"})
        except ClientError as exc:
            self.counts.failures += 1
            self.counts.last_failure = f"GET {path}: {exc}"
            return
        self.counts.latency.observe(loop.time() - began)
        statuses = self.counts.statuses
        statuses[response.status] = statuses.get(response.status, 0) + 1
        try:
            instance = json.loads(response.body)["api"]["instance"]
        except (ValueError, KeyError, TypeError):
            return
        if isinstance(instance, str):
            instances = self.counts.api_instances
            instances[instance] = instances.get(instance, 0) + 1
