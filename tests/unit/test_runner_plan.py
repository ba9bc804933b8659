"""`meshling run`'s plan: the proxy's arguments, its admin address and the app's variables,
read from the same options and files as `meshling proxy run`."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshling.runner.plan import PlanError, ProxyPlan, env_name, host_port, reachable, resolve

SNAPSHOT = """
version: "1"
admin: {address: 0.0.0.0, port: 19901, token: t}
listeners:
  - name: out-api
    port: 15001
    filter_chains: [{tcp: {cluster: api}}]
  - name: in
    address: "::1"
    port: 15006
    filter_chains: [{tcp: {cluster: api}}]
clusters:
  - name: api
    endpoints: [{address: 127.0.0.1, port: 8080}]
"""

DATAPLANE = """
kind: Dataplane
metadata: {name: web-1, mesh: default}
spec:
  service: web
  address: 127.0.0.1
  inbounds: [{port: 15006, service_port: 8080, protocol: http}]
  outbounds:
    - {port: 15001, service: api, protocol: http}
    - {port: 15002, service: order-store, protocol: tcp}
  admin: {port: 19902}
"""


def plan_for(environ: dict[str, str] | None = None, **options: str | None) -> ProxyPlan:
    values: dict[str, str | None] = dict.fromkeys(
        ("config", "cp", "token_file", "dataplane", "data_dir", "cp_ca_file")
    )
    values.update(options)
    return resolve(**values, environ=environ or {})


def test_runner_plan_names_and_addresses() -> None:
    assert env_name("MESHLING_OUTBOUND_", "order-store.v2") == "MESHLING_OUTBOUND_ORDER_STORE_V2"
    assert reachable("0.0.0.0") == "127.0.0.1"
    assert reachable("::") == "::1"
    assert reachable("127.0.0.2") == "127.0.0.2"
    assert host_port("::1", 80) == "[::1]:80"


def test_runner_plan_standalone_reads_admin_and_listeners(tmp_path: Path) -> None:
    config = tmp_path / "snap.yaml"
    config.write_text(SNAPSHOT)
    plan = resolve(
        config=str(config),
        cp=None,
        token_file=None,
        dataplane=None,
        data_dir=None,
        cp_ca_file=None,
        environ={},
    )
    assert plan.args == ("proxy", "run", "--config", str(config))
    assert (plan.admin_host, plan.admin_port, plan.admin) == ("127.0.0.1", 19901, "127.0.0.1:19901")
    assert plan.env == {
        "MESHLING_ADMIN": "127.0.0.1:19901",
        "MESHLING_LISTENER_OUT_API": "127.0.0.1:15001",
        "MESHLING_LISTENER_IN": "[::1]:15006",
    }


def test_runner_plan_standalone_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "snap.yaml"
    config.write_text(SNAPSHOT)
    plan = plan_for({"MESHLING_CONFIG": str(config)})
    assert plan.args[-1] == str(config)


def test_runner_plan_control_plane_reads_the_dataplane(tmp_path: Path) -> None:
    dataplane = tmp_path / "web-1.yaml"
    dataplane.write_text(DATAPLANE)
    plan = resolve(
        config=None,
        cp="http://127.0.0.1:5681",
        token_file=None,
        dataplane=str(dataplane),
        data_dir=None,
        cp_ca_file="ca.pem",
        environ={"MESHLING_TOKEN_FILE": "web.token", "MESHLING_DATA_DIR": "/var/lib/web"},
    )
    assert plan.args == (
        "proxy",
        "run",
        "--cp",
        "http://127.0.0.1:5681",
        "--token-file",
        "web.token",
        "--dataplane",
        str(dataplane),
        "--data-dir",
        "/var/lib/web",
        "--cp-ca-file",
        "ca.pem",
    )
    assert plan.admin == "127.0.0.1:19902"
    assert plan.env == {
        "MESHLING_ADMIN": "127.0.0.1:19902",
        "MESHLING_OUTBOUND_API": "127.0.0.1:15001",
        "MESHLING_OUTBOUND_ORDER_STORE": "127.0.0.1:15002",
    }


def test_runner_plan_errors_name_the_file_field_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SNAPSHOT.replace("port: 19901", "port: nineteen"))
    with pytest.raises(PlanError, match=r"bad\.yaml: admin\.port"):
        plan_for(config=str(bad))
    with pytest.raises(PlanError, match="cannot read file"):
        plan_for(config=str(tmp_path / "missing.yaml"))
    dataplane = tmp_path / "dp.yaml"
    dataplane.write_text(DATAPLANE.replace("port: 19902", "port: 99999"))
    with pytest.raises(PlanError, match=r"dp\.yaml: spec\.admin\.port"):
        plan_for(cp="http://127.0.0.1:1", token_file="t", dataplane=str(dataplane))
    with pytest.raises(PlanError, match="--token-file"):
        plan_for(cp="http://127.0.0.1:1", dataplane=str(dataplane))
    with pytest.raises(PlanError, match="--dataplane"):
        plan_for(cp="http://127.0.0.1:1", token_file="t")
    with pytest.raises(PlanError, match="both set"):
        plan_for({"MESHLING_CONFIG": "a", "MESHLING_CP": "b"})
    with pytest.raises(PlanError, match="--config FILE"):
        plan_for()
