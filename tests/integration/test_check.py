"""`meshling check` against a real control plane (mTLS strict) and two real proxies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Nginx, wait_for
from .cp_mesh import ControlPlane
from .test_agent_cp import mesh

pytestmark = pytest.mark.integration


def check(cp: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MESHLING_CP": cp.url,
        "MESHLING_ADMIN_TOKEN_FILE": str(cp.root / "cp" / "admin.token"),
    }
    return subprocess.run(
        [sys.executable, "-m", "meshling", "check", "--cp", cp.url, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def test_check_passes_on_a_healthy_mesh_and_names_what_fails(nginx: Nginx, tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path, mtls="strict")
    cp.start()
    api, web, _ = mesh(cp, nginx, tmp_path)
    try:
        wait_for(lambda: check(cp).returncode == 0, 20, "a passing check")
        out = check(cp)
        assert "ok   all 2 proxies are connected" in out.stdout
        assert "ok   all 2 online proxies run their latest snapshot" in out.stdout
        assert "ok   none expires within 6h0m" in out.stdout
        # the proxies' certificates (24h) all expire within a week
        out = check(cp, "--expiry-warning", "7d")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "FAIL default/api-1's certificate expires in" in out.stdout
        assert "FAIL default/web-1's certificate expires in" in out.stdout
        out = check(cp, "--expiry-warning", "soon")
        assert out.returncode == 2 and "--expiry-warning" in out.stderr
    finally:
        web.stop_all()
        api.stop_all()
        cp.stop()
    out = check(cp)
    assert out.returncode == 2
    assert "FAIL cannot reach the control plane at" in out.stdout
