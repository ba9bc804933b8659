"""Bad input against a live mesh: a real `meshling control-plane run` (mTLS strict), two
real proxies in control-plane mode (web-1 -> mTLS -> api-1 -> nginx) and steady traffic
through them.

Each bad input is given as a user would give it (`meshling apply -f`, `meshling token`,
`meshling proxy run --cp`, or the API), and each must get an error that says where and
why (exit status, file and document, field, reason), while nothing moves: the stored
resources keep their versions, both proxies keep the snapshot they run (same version,
no push applied, still connected to the same stream) and not one request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from meshling.configstream import Hello, encode
from meshling.controlplane.cli import run as cli
from meshling.controlplane.resources import kinds
from meshling.identity import SpiffeId, make_key_and_csr

from . import conftest
from .conftest import Nginx, free_port, http_get, wait_for
from .cp_mesh import ControlPlane, Dataplane
from .test_agent import metric
from .test_agent_cp import mesh
from .test_cp_stream import ProxyClient
from .test_lifecycle import Load

pytestmark = pytest.mark.integration

KINDS = kinds()
# a burst of changes reaches the proxies within ~0.1 s (docs/config-stream.md): a bad
# input that did get through would have moved them by then
SETTLE = 0.6

# what the first documents of the bad files would do if they were applied: cut web off
DENY_WEB = """\
kind: TrafficPermission
metadata: {name: web-to-api, mesh: default}
spec:
  destination: {service: api}
  rules:
    - action: deny
      sources: [{service: web}]
"""


@dataclass
class LiveMesh:
    root: Path
    cp: ControlPlane
    api: Dataplane
    web: Dataplane
    outbound: int

    @property
    def admin_token(self) -> Path:
        return self.root / "cp" / "admin.token"

    def meshling(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """`meshling ARGS` as a user runs it, against this control plane."""
        return subprocess.run(
            [sys.executable, "-m", "meshling", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            env={"MESHLING_CP": self.cp.url, "MESHLING_ADMIN_TOKEN_FILE": str(self.admin_token)},
            cwd=self.root,
        )

    def api_call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        token = self.admin_token.read_text().strip()
        return httpx.request(
            method,
            self.cp.url + path,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
            **kwargs,
        )

    def inspect(self, name: str) -> dict[str, Any]:
        """`meshling inspect dataplane NAME -o json`."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli(
                [
                    "inspect",
                    "dataplane",
                    name,
                    "-o",
                    "json",
                    "--cp",
                    self.cp.url,
                    "--token-file",
                    str(self.admin_token),
                ]
            )
        assert code == 0
        status: dict[str, Any] = json.loads(out.getvalue())
        return status

    def state(self) -> dict[str, Any]:
        """What must not move: every stored resource's version, and each proxy's snapshot
        (from its own admin port and from the control plane's status) and stream."""
        store = {}
        for kind in KINDS:
            listed = self.api_call("GET", f"/api/v1/{kind}").json()["items"]
            store[kind] = sorted(
                (i["metadata"].get("mesh", ""), i["metadata"]["name"], i["metadata"]["version"])
                for i in listed
            )
        proxies = {}
        for proxy in (self.api, self.web):
            config = json.loads(http_get(proxy.admin + "/config")[1])
            metrics = proxy.metrics()
            status = self.inspect(proxy.name)
            proxies[proxy.name] = {
                "running": config["version"],
                "pushes applied": metric(metrics, "meshling_control_plane_snapshots_total"),
                "connected": metric(metrics, "meshling_control_plane_connected"),
                "applied": status["applied"],
                "pushed": status["pushed"],
                "online": status["online"],
                "connected_at": status["connected_at"],
                "last_nack": status["last_nack"],
            }
        return {"store": store, "proxies": proxies}

    @contextlib.contextmanager
    def nothing_changes(self) -> Iterator[None]:
        """Traffic flows through web -> api throughout, and the state is the same after."""
        before = self.state()
        assert all(p["connected"] == 1 and p["online"] for p in before["proxies"].values())
        load = Load(self.outbound, clients=2, seconds=60, path="/hello")
        try:
            yield
            time.sleep(SETTLE)
        finally:
            load.finish()
        assert self.state() == before
        assert load.failures == [], load.failures[:5]
        assert load.ok > 0

    def proxy_process(self, name: str, service: str, token: Path) -> subprocess.Popen[str]:
        """`meshling proxy run --cp` for a dataplane `name` of `service` with `token`."""
        document = {
            "kind": "Dataplane",
            "metadata": {"name": name, "mesh": "default"},
            "spec": {
                "service": service,
                "address": "127.0.0.1",
                "inbounds": [{"port": free_port(), "service_port": 8080, "protocol": "http"}],
                "admin": {"port": free_port()},
            },
        }
        dataplane = self.root / f"{name}-{token.stem}.yaml"
        dataplane.write_text(yaml.safe_dump(document))
        log = self.root / f"{name}-{token.stem}.log"
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshling",
                "proxy",
                "run",
                "--cp",
                self.cp.url,
                "--token-file",
                str(token),
                "--dataplane",
                str(dataplane),
                "--data-dir",
                str(self.root / f"{name}-{token.stem}-data"),
            ],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )

    def refused_proxy(self, name: str, service: str, token: Path, says: str) -> str:
        """Runs a proxy that must be refused; its log, once it says `says`."""
        proc = self.proxy_process(name, service, token)
        log = self.root / f"{name}-{token.stem}.log"
        try:
            wait_for(lambda: says in log.read_text(), 20, f"the refusal of {name} in its log")
            assert proc.poll() is None  # it keeps trying (slowly), it does not crash
        finally:
            proc.terminate()
            proc.wait(15)
        return log.read_text()

    def issue_token(self, service: str, file: str, ttl: str = "1h") -> str:
        """`meshling token dataplane --service S -o FILE`; the token's id."""
        done = self.meshling("token", "dataplane", "--service", service, "--ttl", ttl, "-o", file)
        assert done.returncode == 0, done.stderr
        found = re.search(r"\(id ([0-9a-f]{32}),", done.stdout)
        assert found, done.stdout
        return found.group(1)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMesh]:
    root = tmp_path_factory.mktemp("bad-input")
    # conftest's nginx fixture, once for the whole module
    with contextlib.contextmanager(conftest.nginx.__wrapped__)() as nginx:
        assert isinstance(nginx, Nginx)
        cp = ControlPlane(root, mtls="strict")
        cp.start()
        api = web = None
        try:
            api, web, outbound = mesh(cp, nginx, root)
            wait_for(
                lambda: http_get(f"http://127.0.0.1:{outbound}/hello")[0] == 200,
                20,
                "web -> api over mTLS",
            )
            yield LiveMesh(root, cp, api, web, outbound)
        finally:
            for proxy in (web, api):
                if proxy is not None:
                    proxy.stop_all()
            cp.stop()


def write(live: LiveMesh, name: str, text: str) -> Path:
    path = live.root / name
    path.write_text(textwrap.dedent(text))
    return path


def test_cp_bad_input_malformed_yaml_in_document_3_applies_nothing(live: LiveMesh) -> None:
    path = write(
        live,
        "malformed.yaml",
        DENY_WEB
        + """\
---
kind: TrafficPermission
metadata: {name: web-to-api-2, mesh: default}
spec:
  destination: {service: api}
  rules: [{action: allow, sources: [{service: web}]}]
---
kind: TrafficPermission
metadata: {name: broken, mesh: default
spec: {}
---
kind: Mesh
metadata: {name: default}
spec: {mtls: {enabled: false}}
""",
    )
    with live.nothing_changes():
        done = live.meshling("apply", "-f", str(path))
    assert done.returncode == 1
    assert (
        f"{path} (document 3, line 17, column 5): malformed YAML: expected ',' or "
        "'}', but got ':' (while parsing a flow mapping); nothing applied" in done.stderr
    ), done.stderr
    assert "nothing applied" in done.stderr
    assert done.stdout == ""


def test_cp_bad_input_unknown_kind_applies_nothing(live: LiveMesh) -> None:
    path = write(
        live,
        "unknown-kind.yaml",
        DENY_WEB
        + """\
---
kind: TrafficPermision
metadata: {name: typo, mesh: default}
spec: {}
""",
    )
    with live.nothing_changes():
        done = live.meshling("apply", "-f", str(path))
        r = live.api_call(
            "POST",
            "/api/v1/resources",
            json={"kind": "TrafficPermision", "metadata": {"name": "typo", "mesh": "default"}},
        )
        listed = live.api_call("GET", "/api/v1/TrafficPermision")
        got = live.meshling("get", "trafficpermisions")
    assert done.returncode == 1
    assert (
        f"{path} (document 2): kind: unknown kind 'TrafficPermision' "
        f"(known: {', '.join(kinds())})" in done.stderr
    ), done.stderr
    assert "1 of 2 documents are invalid; nothing applied" in done.stderr
    assert r.status_code == 400 and r.json()["field"] == "kind", r.text
    assert "unknown kind 'TrafficPermision'" in r.json()["reason"]
    assert listed.status_code == 400 and "known: Mesh, Dataplane" in listed.json()["reason"]
    assert got.returncode == 1 and "unknown kind 'trafficpermisions'" in got.stderr


def test_cp_bad_input_a_policy_selecting_nothing_is_refused_unless_allowed(
    live: LiveMesh,
) -> None:
    path = write(
        live,
        "unmatched.yaml",
        DENY_WEB
        + """\
---
kind: TrafficPermission
metadata: {name: web-to-apii, mesh: default}
spec:
  destination: {service: apii}
  rules: [{action: allow, sources: [{service: web}]}]
""",
    )
    unmatched = {
        "kind": "TrafficPermission",
        "metadata": {"name": "web-to-apii", "mesh": "default"},
        "spec": {
            "destination": {"service": "apii"},
            "rules": [{"action": "allow", "sources": [{"service": "web"}]}],
        },
    }
    with live.nothing_changes():
        done = live.meshling("apply", "-f", str(path))
        created = live.api_call("POST", "/api/v1/resources", json=unmatched)
        # moving a stored permission onto nothing is refused the same way
        current = live.api_call("GET", "/api/v1/TrafficPermission/default/web-to-api").json()
        moved = {**current, "spec": {**current["spec"], "destination": {"service": "apii"}}}
        replaced = live.api_call("PUT", "/api/v1/TrafficPermission/default/web-to-api", json=moved)
    assert done.returncode == 1
    reason = "selects no dataplane in mesh default: no dataplane of service apii is registered"
    assert (
        f"{path} (document 2): spec.destination.service: {reason} (apply it once they "
        "register, or store it anyway with --allow-unmatched)" in done.stderr
    ), done.stderr
    assert "1 of 2 documents would be refused; nothing applied" in done.stderr
    for r in (created, replaced):
        assert r.status_code == 400, r.text
        body = r.json()
        assert (body["field"], body["reason"]) == ("spec.destination.service", reason)
        assert "allow_unmatched=true" in body["hint"]

    # asked to, the control plane stores it; it selects no proxy, so none moves
    alone = write(live, "unmatched-alone.yaml", yaml.safe_dump(unmatched))
    before = live.state()
    stored = live.meshling("apply", "--allow-unmatched", "-f", str(alone))
    assert stored.returncode == 0, stored.stderr
    assert stored.stdout == "TrafficPermission/default/web-to-apii created\n"
    time.sleep(SETTLE)
    after = live.state()
    assert after["proxies"] == before["proxies"]
    assert [n for _, n, _ in after["store"]["TrafficPermission"]] == ["web-to-api", "web-to-apii"]
    removed = live.meshling("delete", "trafficpermission", "web-to-apii")
    assert removed.returncode == 0, removed.stderr


def test_cp_bad_input_a_token_for_another_service_gets_nothing(live: LiveMesh) -> None:
    live.issue_token("web", "web-other.token")
    token = live.root / "web-other.token"
    with live.nothing_changes():
        # a proxy of api with web's token: its CSR asks for api's identity
        log = live.refused_proxy("api-2", "api", token, "answered 403")
        assert "csr identity spiffe://default/api does not match the token's service web" in log, (
            log
        )
        # web's token on a dataplane named api-1, the name of api's running proxy
        log = live.refused_proxy("api-1", "web", token, "answered 403")
        assert "dataplane api-1 is service api, not the token's service web" in log, log

        # the stream itself: a hello for api-1 with web's token does not take the running
        # api-1's place
        async def hello() -> tuple[str, str, int]:
            proxy = await ProxyClient.connect(
                live.cp.url.replace("http://", "ws://") + "/api/v1/stream",
                token.read_text().strip(),
            )
            await proxy.connection.send(encode(Hello(live.api.document)))
            refusal, code = await proxy.refused()
            return refusal.reason, refusal.message, code

        reason, message, code = asyncio.run(asyncio.wait_for(hello(), 20))
    assert (reason, code) == ("forbidden", 4403)
    assert "token is for service 'web'" in message, message


def test_cp_bad_input_expired_and_revoked_tokens_get_nothing(live: LiveMesh) -> None:
    live.issue_token("api", "expired.token", ttl="1s")
    jti = live.issue_token("api", "revoked.token")
    revoked = live.meshling("token", "revoke", jti)
    assert revoked.returncode == 0 and f"token {jti} revoked" in revoked.stdout, revoked.stderr
    time.sleep(1.5)
    with live.nothing_changes():
        log = live.refused_proxy("api-2", "api", live.root / "expired.token", "answered 401")
        assert "the dataplane token has expired" in log, log
        log = live.refused_proxy("api-3", "api", live.root / "revoked.token", "answered 401")
        assert "revoked" in log and jti in log, log
    statuses = live.api_call("GET", "/api/v1/status/dataplanes").json()["items"]
    assert sorted(s["name"] for s in statuses) == ["api-1", "web-1"]


def test_cp_bad_input_a_csr_for_another_identity_is_refused(live: LiveMesh) -> None:
    token = live.root / "api-csr.token"
    live.issue_token("api", token.name)
    _, csr = make_key_and_csr(SpiffeId.for_service("default", "web"))
    with live.nothing_changes():
        r = httpx.post(
            live.cp.url + "/api/v1/ca/sign",
            json={"csr": csr.decode(), "dataplane": "api-1"},
            headers={"Authorization": f"Bearer {token.read_text().strip()}"},
            timeout=10,
        )
    assert r.status_code == 403, r.text
    body = r.json()
    assert (body["field"], body["reason"]) == ("csr", "identity_mismatch")
    assert body["error"] == (
        "csr identity spiffe://default/web does not match the token's service api"
    )
    assert body["expected"] == "spiffe://default/api"


def test_cp_bad_input_a_stale_version_is_refused(live: LiveMesh) -> None:
    read = live.meshling("get", "trafficpermission", "web-to-api", "-o", "yaml")
    assert read.returncode == 0, read.stderr
    document = yaml.safe_load(read.stdout)
    version = document["metadata"]["version"]
    # someone else changes it in between (spells out the default: no snapshot moves)
    newer = {**document, "spec": {**document["spec"], "shadow": False}}
    r = live.api_call("PUT", "/api/v1/TrafficPermission/default/web-to-api", json=newer)
    assert r.status_code == 200, r.text
    time.sleep(SETTLE)
    # the user's edit of what they read: cut web off
    document["spec"]["rules"][0]["action"] = "deny"
    path = write(live, "stale.yaml", yaml.safe_dump(document, sort_keys=False))
    with live.nothing_changes():
        done = live.meshling("apply", "-f", str(path))
        put = live.api_call("PUT", "/api/v1/TrafficPermission/default/web-to-api", json=document)
    assert done.returncode == 1
    assert (
        f"{path} (document 1): metadata.version: stale version {version}: "
        f"TrafficPermission/default/web-to-api is at version {version + 1}" in done.stderr
    ), done.stderr
    assert "nothing applied" in done.stderr
    assert put.status_code == 409, put.text
    assert (put.json()["given"], put.json()["current"]) == (version, version + 1)
