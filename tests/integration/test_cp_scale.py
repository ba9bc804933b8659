"""A thousand proxies on one control plane (a real process, SQLite), and a permission
that touches every one of them: how long until each has its new snapshot and ACKed it."""

from __future__ import annotations

import asyncio
import os
import resource
import time
from pathlib import Path

import pytest

from meshling.configstream import Push

from .test_cp_stream import TLS, ProxyClient, dataplane, eventually, run, start_control_plane

pytestmark = pytest.mark.integration

PROXIES = int(os.environ.get("MESHLING_SCALE_PROXIES", "1000"))
SERVICES = 50
# the target is 1 s; the bound asserted leaves room for a loaded test machine, where the
# proxies' side of this test shares the CPUs with the control plane
P99_BOUND = float(os.environ.get("MESHLING_SCALE_P99", "2.0"))


def test_cp_scale_a_permission_for_every_proxy_is_acked_quickly(tmp_path: Path) -> None:
    # a socket per proxy on each side: raise the soft limit (the control plane inherits it)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * PROXIES + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    cp = start_control_plane(tmp_path, "--mesh-mtls", "strict")

    async def body() -> None:
        tokens = {f"svc{s}": cp.dataplane_token(f"svc{s}") for s in range(SERVICES)}
        proxies: list[ProxyClient] = []
        latest: list[str] = []

        async def connect(n: int) -> None:
            service = f"svc{n % SERVICES}"
            proxy = await ProxyClient.connect(cp.ws, tokens[service])
            document = dataplane(
                f"{service}-{n}",
                service,
                address=f"10.{n // 250}.{n % 250}.1",
                outbound=f"svc{(n + 1) % SERVICES}",
            )
            push = await proxy.hello(document, tls=TLS)
            await proxy.ack(push)
            proxies.append(proxy)

        started = time.monotonic()
        for start in range(0, PROXIES, 100):
            await asyncio.gather(*(connect(n) for n in range(start, min(start + 100, PROXIES))))
        connected = time.monotonic() - started

        # drain the rebuilds the registrations caused (new endpoints), ACKing each
        async def drain(proxy: ProxyClient) -> None:
            while True:
                try:
                    message = await proxy.receive(1.0)
                except TimeoutError:
                    return
                assert isinstance(message, Push)
                await proxy.ack(message)

        await asyncio.gather(*map(drain, proxies))

        latencies: list[float] = []

        async def await_push(proxy: ProxyClient, t0: float) -> None:
            message = await proxy.receive(30)
            assert isinstance(message, Push)
            await proxy.ack(message)
            latencies.append(time.monotonic() - t0)
            latest.append(message.version)

        t0 = time.monotonic()
        waiting = [asyncio.create_task(await_push(p, t0)) for p in proxies]
        await asyncio.to_thread(
            cp.apply,
            {
                "kind": "TrafficPermission",
                "metadata": {"name": "everyone-from-svc0", "mesh": "default"},
                "spec": {
                    "destination": {"service": "*"},
                    "rules": [{"action": "allow", "sources": [{"service": "svc0"}]}],
                },
            },
        )
        await asyncio.gather(*waiting)
        latencies.sort()
        p50 = latencies[len(latencies) // 2]
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        # every ACK reaches the status, through batched writes
        applied = set(latest)

        def all_applied() -> bool:
            items = cp.get("/api/v1/status/dataplanes")["items"]
            return sum(1 for i in items if i["applied"] in applied) == PROXIES

        await eventually(all_applied, timeout=15, what="every ACK in the status")
        status_done = time.monotonic() - t0
        print(
            f"\n{PROXIES} proxies: connected in {connected:.1f}s; permission for all: "
            f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} "
            f"ms; all ACKs in the status after {status_done:.1f}s"
        )
        assert p99 <= P99_BOUND, f"p99 {p99:.2f}s"
        await asyncio.gather(*(p.close() for p in proxies))

    try:
        run(body(), timeout=120)
    finally:
        cp.stop()
