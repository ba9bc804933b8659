"""The proxy stays lean: running it loads neither the control plane's web stack nor the
other policies' parsers, and loads the TLS and identity stack only for snapshots that
use TLS (it is imported when a TLS chain or cluster is compiled)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "cryptography",
    "starlette",
    "uvicorn",
    "httpx",
    "redis",
    "websockets",
    "asyncpg",
    "meshling.controlplane",
    "meshling.identity",
    "meshling.agent",
)


def test_the_proxy_imports_none_of_the_heavy_modules() -> None:
    code = (
        "import sys\n"
        "import meshling.proxy.server, meshling.proxy.http, meshling.proxy.tcp\n"
        "import meshling.proxy.retry, meshling.proxy.balancer, meshling.proxy.health\n"
        f"heavy = {HEAVY!r}\n"
        "loaded = sorted({h for h in heavy for m in sys.modules if m == h or m.startswith(h + '.')})\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"the proxy imports {out}"
