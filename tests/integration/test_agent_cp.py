"""`meshling proxy run --cp` against a real `meshling control-plane run` process.

web proxy (outbound, plaintext from the app) -> mTLS -> api proxy (inbound) -> nginx, both
proxies configured by the control plane. Steady traffic goes through the web proxy while
the control plane stops, the proxies are restarted in place (the new process binds the
same ports, TLS listeners included, while the old one drains) and the control plane comes
back: not one request may fail.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .conftest import Nginx, http_get, wait_for
from .cp_mesh import ControlPlane, Dataplane, allow, start_ready, web_and_service
from .test_agent import metric
from .test_lifecycle import Load

pytestmark = pytest.mark.integration


def restart(proxy: Dataplane) -> None:
    """A new process on the same ports (SO_REUSEPORT), ready from the cache; then the
    old one drains."""
    old = proxy.procs[-1]
    proxy.start()
    wait_for(lambda: "ready: snapshot" in proxy.logs(), 20, f"the new {proxy.name} ready")
    assert "running the cached snapshot" in proxy.logs()
    old.terminate()
    assert old.wait(15) == 0


def mesh(cp: ControlPlane, nginx: Nginx, tmp_path: Path) -> tuple[Dataplane, Dataplane, int]:
    """api-1 (inbound to nginx) and web-1 (outbound to api), started and serving."""
    # applied before api-1 registers, as a GitOps set-up would: it selects nothing yet
    cp.apply_unmatched(allow("web", "api"))
    api, web, outbound = web_and_service(tmp_path, cp, "api", nginx.port)
    start_ready(api, web)
    for proxy in (api, web):
        text = proxy.metrics()
        assert metric(text, "meshling_control_plane_connected") == 1
        assert metric(text, 'meshling_certificate_renewals_total{result="ok"}') == 1
    return api, web, outbound


def test_agent_cp_zero_failures_while_the_control_plane_is_away_and_proxies_restart(
    nginx: Nginx, tmp_path: Path
) -> None:
    # mTLS off: plaintext listeners handed over (the strict-mTLS test below does TLS)
    cp = ControlPlane(tmp_path, mtls="off")
    cp.start()
    api, web, outbound = mesh(cp, nginx, tmp_path)
    try:
        # the web proxy learns the api endpoint once api-1 registered
        wait_for(lambda: http_get(f"http://127.0.0.1:{outbound}/hello")[0] == 200, 20, "web -> api")
        load = Load(outbound, clients=4, seconds=120, path="/hello")
        try:
            time.sleep(1)
            cp.stop()
            for proxy in (api, web):
                wait_for(
                    lambda p=proxy: metric(p.metrics(), "meshling_control_plane_connected") == 0,
                    15,
                    f"{proxy.name} sees the control plane gone",
                )
            time.sleep(1)
            restart(web)
            time.sleep(1)
            restart(api)
            time.sleep(2)
            cp.start()
            for proxy in (api, web):
                wait_for(
                    lambda p=proxy: metric(p.metrics(), "meshling_control_plane_connected") == 1,
                    45,
                    f"{proxy.name} reconnected",
                )
            time.sleep(1)
        finally:
            load.finish()
        assert load.failures == [], load.failures[:5]
        assert load.ok > 100
    finally:
        web.stop_all()
        api.stop_all()
        cp.stop()


def test_agent_cp_mtls_between_two_proxies_and_a_control_plane_outage(
    nginx: Nginx, tmp_path: Path
) -> None:
    cp = ControlPlane(tmp_path, mtls="strict")
    cp.start()
    api, web, outbound = mesh(cp, nginx, tmp_path)
    try:
        wait_for(
            lambda: http_get(f"http://127.0.0.1:{outbound}/echo-headers")[0] == 200,
            20,
            "web -> api over mTLS",
        )
        load = Load(outbound, clients=4, seconds=60, path="/echo-headers")
        try:
            time.sleep(1)
            cp.stop()
            time.sleep(2)
            restart(web)
            time.sleep(1)
            # the mTLS inbound: the new process shares the TLS listener's port, then the
            # old one drains; web's pooled connections to it close after their response
            restart(api)
            time.sleep(1)
            cp.start()
            for proxy in (api, web):
                wait_for(
                    lambda p=proxy: metric(p.metrics(), "meshling_control_plane_connected") == 1,
                    45,
                    f"{proxy.name} reconnected",
                )
            time.sleep(1)
        finally:
            load.finish()
        assert load.failures == [], load.failures[:5]
        assert load.ok > 100
        assert any(b"id=spiffe://default/web " in body for body in load.bodies)
        # the new api process took web's connections over mTLS, under the permission
        assert len(api.procs) == 2 and api.procs[0].poll() == 0
        allowed = [
            line
            for line in api.metrics().splitlines()
            if line.startswith("meshling_authz_decisions_total{") and 'result="allowed"' in line
        ]
        assert allowed and float(allowed[0].rsplit(" ", 1)[1]) > 0, allowed
    finally:
        web.stop_all()
        api.stop_all()
        cp.stop()
