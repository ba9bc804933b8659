"""`meshling apply / get / delete` against a real control-plane process over SQLite."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from meshling.controlplane.cli import run
from meshling.controlplane.client import ApiError, Client

from .conftest import free_port, wait_for

pytestmark = pytest.mark.integration

KINDS = ("Mesh", "Dataplane", "TrafficPermission")

RESOURCES = """
kind: Mesh
metadata: {name: default}
spec:
  mtls: {enabled: true}
---
kind: Dataplane
metadata: {name: api-1, mesh: default, labels: {team: a}}
spec:
  service: api
  address: 10.0.0.7
  inbounds: [{port: 15006, service_port: 8080}]
---
kind: Dataplane
metadata: {name: web-1, mesh: default, labels: {team: b}}
spec:
  service: web
  address: 10.0.0.8
  inbounds: [{port: 15006, service_port: 8080}]
---
kind: TrafficPermission
metadata: {name: web-to-api, mesh: default}
spec:
  destination: {service: api}
  rules:
    - action: allow
      sources: [{service: web}]
"""


@dataclass
class ControlPlane:
    url: str
    token: str

    def args(self) -> list[str]:
        return ["--cp", self.url, "--token", self.token]

    def client(self) -> Client:
        return Client(self.url, self.token)


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    tmp = tmp_path_factory.mktemp("cp")
    port = free_port()
    token_file = tmp / "admin.token"
    code = textwrap.dedent(
        f"""
        import sys
        from meshling.controlplane.api import run
        sys.exit(run({str(tmp / "cp.db")!r}, "127.0.0.1", {port}, {str(token_file)!r}))
        """
    )
    log = tmp / "cp.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the control plane exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    try:
        wait_for(healthy, timeout=10, what="the control plane")
        yield ControlPlane(url, token_file.read_text().strip())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def cp(control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> Iterator[ControlPlane]:
    """The shared control plane, emptied after each test; no token from the environment."""
    for name in (
        "MESHLING_CP",
        "MESHLING_ADMIN_TOKEN",
        "MESHLING_ADMIN_TOKEN_FILE",
        "MESHLING_CP_CA_FILE",
        "MESHLING_CLI_CONFIG",
    ):
        monkeypatch.delenv(name, raising=False)
    # no config file of the user running the tests
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent")
    yield control_plane
    client = control_plane.client()
    for kind in reversed(KINDS):
        for item in client.list_resources(kind):
            meta = item["metadata"]
            client.delete(kind, meta.get("mesh", meta["name"]), meta["name"])


def stored(cp: ControlPlane) -> dict[str, list[str]]:
    client = cp.client()
    return {kind: [i["metadata"]["name"] for i in client.list_resources(kind)] for kind in KINDS}


def test_apply_creates_then_is_unchanged_then_configures(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "mesh.yaml"
    file.write_text(RESOURCES)
    assert run(["apply", "-f", str(file), *cp.args()]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Mesh/default created",
        "Dataplane/default/api-1 created",
        "Dataplane/default/web-1 created",
        "TrafficPermission/default/web-to-api created",
    ]
    assert stored(cp) == {
        "Mesh": ["default"],
        "Dataplane": ["api-1", "web-1"],
        "TrafficPermission": ["web-to-api"],
    }

    version = cp.client().read("Dataplane", "default", "web-1")["metadata"]["version"]
    assert run(["apply", "-f", str(file), *cp.args()]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(line.endswith(" unchanged") for line in out), out

    file.write_text(RESOURCES.replace("10.0.0.8", "10.0.0.9").replace("team: a", "team: c"))
    assert run(["apply", "-f", str(file), *cp.args()]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Mesh/default unchanged",
        "Dataplane/default/api-1 configured",
        "Dataplane/default/web-1 configured",
        "TrafficPermission/default/web-to-api unchanged",
    ]
    web = cp.client().read("Dataplane", "default", "web-1")
    assert (web["metadata"]["version"], web["spec"]["address"]) == (version + 1, "10.0.0.9")
    assert cp.client().read("Dataplane", "default", "api-1")["metadata"]["labels"] == {"team": "c"}


def test_apply_a_directory_and_stdin(
    cp: ControlPlane,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    documents = RESOURCES.split("---")
    (tmp_path / "1-mesh.yaml").write_text(documents[0])
    (tmp_path / "2-dataplanes.yml").write_text("---".join(documents[1:3]))
    (tmp_path / "3-policy.json").write_text(json.dumps(yaml.safe_load(documents[3])))
    (tmp_path / "notes.txt").write_text("not a resource")
    assert run(["apply", "-f", str(tmp_path), *cp.args()]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "Mesh/default",
        "Dataplane/default/api-1",
        "Dataplane/default/web-1",
        "TrafficPermission/default/web-to-api",
    ]

    # what `get -o yaml` prints can be applied back unchanged
    assert run(["get", "dataplanes", "-o", "yaml", *cp.args()]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(capsys.readouterr().out))
    assert run(["apply", "-f", "-", *cp.args()]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Dataplane/default/api-1 unchanged",
        "Dataplane/default/web-1 unchanged",
    ]


def test_an_invalid_document_stops_the_whole_apply(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = RESOURCES.replace(
        "inbounds: [{port: 15006, service_port: 8080}]\n---\nkind: Data",
        "inbounds: [{port: 70000, service_port: 8080}]\n---\nkind: Data",
    )
    file = tmp_path / "bad.yaml"
    file.write_text(bad)
    assert run(["apply", "-f", str(file), *cp.args()]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{file} (document 2): spec.inbounds[0].port:" in captured.err
    assert "nothing applied" in captured.err
    assert stored(cp) == {"Mesh": [], "Dataplane": [], "TrafficPermission": []}

    file.write_text(RESOURCES + "---\nkind: Gateway\nmetadata: {name: g, mesh: default}\n")
    assert run(["apply", "-f", str(file), *cp.args()]) == 1
    assert f"{file} (document 5): kind: unknown kind 'Gateway'" in capsys.readouterr().err

    file.write_text("kind: Mesh\nmetadata: {name: [")
    assert run(["apply", "-f", str(file), *cp.args()]) == 1
    assert "malformed YAML" in capsys.readouterr().err
    assert stored(cp) == {"Mesh": [], "Dataplane": [], "TrafficPermission": []}


def test_a_policy_must_follow_what_it_selects_unless_allow_unmatched(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    documents = RESOURCES.split("---\n")
    # the permission before the dataplanes it selects: refused before anything is sent
    file = tmp_path / "early.yaml"
    file.write_text("---\n".join([documents[0], documents[3], documents[1], documents[2]]))
    assert run(["apply", "-f", str(file), *cp.args()]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        f"{file} (document 2): spec.destination.service: selects no dataplane in mesh "
        "default: no dataplane of service api is registered (apply it once they register, "
        "or store it anyway with --allow-unmatched)"
    ) in captured.err
    assert "1 of 4 documents would be refused; nothing applied" in captured.err
    assert stored(cp) == {"Mesh": [], "Dataplane": [], "TrafficPermission": []}

    assert run(["apply", "--allow-unmatched", "-f", str(file), *cp.args()]) == 0
    assert stored(cp)["TrafficPermission"] == ["web-to-api"]
    # in the order of RESOURCES, a dataplane applied before it is enough
    for kind, name in (("TrafficPermission", "web-to-api"), ("Dataplane", "api-1")):
        cp.client().delete(kind, "default", name)
    file.write_text(RESOURCES)
    capsys.readouterr()
    assert run(["apply", "-f", str(file), *cp.args()]) == 0, capsys.readouterr().err


def test_an_edit_of_a_stale_read_is_refused(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "resources.yaml"
    file.write_text(RESOURCES)
    assert run(["apply", "-f", str(file), *cp.args()]) == 0
    capsys.readouterr()
    assert run(["get", "dataplane", "web-1", "-o", "yaml", *cp.args()]) == 0
    read = yaml.safe_load(capsys.readouterr().out)
    # unchanged and current: applies
    file.write_text(yaml.safe_dump(read))
    assert run(["apply", "-f", str(file), *cp.args()]) == 0
    assert capsys.readouterr().out == "Dataplane/default/web-1 unchanged\n"
    # edited and current: applies, and moves the version on
    read["spec"]["address"] = "10.0.0.9"
    file.write_text(yaml.safe_dump(read))
    assert run(["apply", "-f", str(file), *cp.args()]) == 0
    assert capsys.readouterr().out == "Dataplane/default/web-1 configured\n"
    # edited again from the same, now stale, read: refused
    read["spec"]["address"] = "10.0.0.10"
    file.write_text(yaml.safe_dump(read))
    assert run(["apply", "-f", str(file), *cp.args()]) == 1
    err = capsys.readouterr().err
    version = read["metadata"]["version"]
    assert (
        f"{file} (document 1): metadata.version: stale version {version}: "
        f"Dataplane/default/web-1 is at version {version + 1}"
    ) in err, err
    current = cp.client().read("Dataplane", "default", "web-1")
    assert current["spec"]["address"] == "10.0.0.9"
    # a version that is no version
    read["metadata"]["version"] = "latest"
    file.write_text(yaml.safe_dump(read))
    assert run(["apply", "-f", str(file), *cp.args()]) == 1
    assert "metadata.version: expected the positive integer" in capsys.readouterr().err


def test_get_as_table_yaml_and_json_with_a_selector(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "mesh.yaml"
    file.write_text(RESOURCES)
    assert run(["apply", "-f", str(file), *cp.args()]) == 0
    capsys.readouterr()

    assert run(["get", "Dataplane", *cp.args()]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "MESH", "VERSION", "AGE", "SERVICE"]
    # a store's versions keep counting across a delete, so only their form is checked
    assert [line.split()[:2] for line in lines[1:]] == [["api-1", "default"], ["web-1", "default"]]
    assert all(line.split()[2].isdigit() for line in lines[1:])
    assert [line.split()[4] for line in lines[1:]] == ["api", "web"]
    assert lines[1].split()[3].endswith("s")

    assert run(["get", "mesh", *cp.args()]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "MESH", "VERSION", "AGE"]
    assert lines[1].split()[:2] == ["default", "default"]

    assert run(["get", "Dataplane", "-l", "team=b", "-o", "json", *cp.args()]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["kind"] == "Dataplane"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["web-1"]

    assert run(["get", "Dataplane", "api-1", "--mesh", "default", "-o", "json", *cp.args()]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["spec"]["service"] == "api" and one["metadata"]["version"] >= 1

    assert run(["get", "TrafficPermission", "web-to-api", "-o", "yaml", *cp.args()]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["spec"]["destination"] == {"service": "api"}

    assert run(["get", "Dataplane", "--mesh", "other", *cp.args()]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no Dataplane resources found" in captured.err

    assert run(["get", "Dataplane", "nope", *cp.args()]) == 1
    assert "Dataplane/default/nope not found" in capsys.readouterr().err
    assert run(["get", "Gateway", *cp.args()]) == 1
    assert "unknown kind 'Gateway'" in capsys.readouterr().err


def test_delete(cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "mesh.yaml"
    file.write_text(RESOURCES)
    assert run(["apply", "-f", str(file), *cp.args()]) == 0
    capsys.readouterr()
    assert run(["delete", "Dataplane", "api-1", "--mesh", "default", *cp.args()]) == 0
    assert capsys.readouterr().out == "Dataplane/default/api-1 deleted\n"
    assert run(["delete", "mesh", "default", *cp.args()]) == 0
    assert capsys.readouterr().out == "Mesh/default deleted\n"
    assert stored(cp) == {"Mesh": [], "Dataplane": ["web-1"], "TrafficPermission": ["web-to-api"]}
    assert run(["delete", "Dataplane", "api-1", *cp.args()]) == 1
    assert "Dataplane/default/api-1 not found" in capsys.readouterr().err
    with pytest.raises(ApiError) as raised:
        cp.client().delete("Dataplane", "default", "api-1")
    assert raised.value.status == 404


def test_a_wrong_or_missing_token_says_which_and_how_to_set_one(
    cp: ControlPlane,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(["get", "Mesh", "--cp", cp.url, "--token", "wrong"]) == 1
    err = capsys.readouterr().err
    assert "refused the token given with --token" in err
    assert "--token-file" in err and "MESHLING_ADMIN_TOKEN" in err

    token_file = tmp_path / "stale.token"
    token_file.write_text("stale\n")
    monkeypatch.setenv("MESHLING_ADMIN_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("MESHLING_CP", cp.url)
    assert run(["get", "Mesh"]) == 1
    assert f"the token in {token_file} ($MESHLING_ADMIN_TOKEN_FILE)" in capsys.readouterr().err

    monkeypatch.delenv("MESHLING_ADMIN_TOKEN_FILE")
    assert run(["get", "Mesh"]) == 1
    assert "refused no token (none was given)" in capsys.readouterr().err

    # the token from the environment, and the one from ./meshling-admin.token, are used
    monkeypatch.setenv("MESHLING_ADMIN_TOKEN", cp.token)
    assert run(["get", "Mesh"]) == 0
    monkeypatch.delenv("MESHLING_ADMIN_TOKEN")
    (tmp_path / "meshling-admin.token").write_text(cp.token + "\n")
    assert run(["get", "Mesh"]) == 0
    assert run(["get", "Mesh", "--token-file", str(tmp_path / "missing")]) == 2
    assert "cannot read the admin token file" in capsys.readouterr().err


def test_the_config_file_names_the_control_plane_and_the_token(
    cp: ControlPlane,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    config_home = tmp_path / "config"
    (config_home / "meshling").mkdir(parents=True)
    (config_home / "meshling" / "admin.token").write_text(cp.token + "\n")
    config = config_home / "meshling" / "config.yaml"
    # token_file is relative to the config file
    config.write_text(f"cp: {cp.url}\ntoken_file: admin.token\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    assert run(["get", "Mesh"]) == 0

    # the environment wins over the file, a flag over both
    monkeypatch.setenv("MESHLING_ADMIN_TOKEN", "wrong")
    assert run(["get", "Mesh"]) == 1
    assert "refused the token in $MESHLING_ADMIN_TOKEN" in capsys.readouterr().err
    assert run(["get", "Mesh", "--token", cp.token]) == 0
    monkeypatch.delenv("MESHLING_ADMIN_TOKEN")

    # a file named explicitly must exist; a bad one names the key and the reason
    assert run(["get", "Mesh", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    config.write_text(f"cp: {cp.url}\ntokn: x\n")
    assert run(["get", "Mesh"]) == 2
    assert f"{config}: tokn: unknown setting (known: cp, token, token_file, ca_file)" in (
        capsys.readouterr().err
    )
    config.write_text("cp: ftp://nowhere\n")
    assert run(["get", "Mesh"]) == 2
    assert f"{config}: cp: expected an http:// or https:// URL" in capsys.readouterr().err


def test_an_unreachable_control_plane_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert run(["get", "Mesh", "--cp", url, "--token", "t"]) == 2
    assert f"cannot reach the control plane at {url}: " in capsys.readouterr().err
    file = tmp_path / "mesh.yaml"
    file.write_text(RESOURCES)
    assert run(["apply", "-f", str(file), "--cp", url, "--token", "t"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "cannot reach the control plane" in captured.err
    assert run(["delete", "Mesh", "default", "--cp", "nowhere:5681"]) == 2
    assert "expected an http:// or https:// URL" in capsys.readouterr().err


def test_cli_resources_commands_are_wired_into_meshling() -> None:
    for argv in (["get", "Mesh"], ["apply", "-f", "-"], ["delete", "Mesh", "default"]):
        result = subprocess.run(
            [sys.executable, "-m", "meshling", *argv, "--cp", "http://127.0.0.1:9", "--token", "t"],
            input="kind: Mesh\nmetadata: {name: default}\nspec: {}\n",
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 2, (argv, result.stderr)
        assert "cannot reach the control plane at http://127.0.0.1:9" in result.stderr
