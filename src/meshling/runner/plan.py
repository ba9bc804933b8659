"""The plan of `meshling run`: which proxy to start, where to ask whether it is ready, and
what the app is told about the mesh.

The options are those of `meshling proxy run`, read the same way (flags over the
environment, `--config` or `--cp`). The admin address comes from the snapshot file (a
standalone proxy) or the Dataplane file (`spec.admin.port` on 127.0.0.1, as the control
plane's snapshot builder places it), which are read and validated here, before anything
starts: a file that cannot run is reported with its field and reason, and nothing is
started at all.

The app gets its environment plus:

* `MESHLING_ADMIN` — the proxy's admin listener, `HOST:PORT`;
* `MESHLING_PROXY_PID` — the proxy's process ID;
* standalone: `MESHLING_LISTENER_<NAME>` — `HOST:PORT` of every listener of the snapshot;
* control-plane mode: `MESHLING_OUTBOUND_<SERVICE>` — `127.0.0.1:PORT` of every outbound
  of the Dataplane, where the app calls that service.

Names are upper-cased, with every character other than a letter or digit made `_`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from meshling.snapshot.load import SnapshotError


class PlanError(Exception):
    """Options or files that cannot make a proxy; the text says which and why."""


@dataclass(frozen=True, slots=True)
class ProxyPlan:
    # the `meshling` arguments that start this proxy
    args: tuple[str, ...]
    # where GET /ready is asked (a wildcard listen address is asked on loopback)
    admin_host: str
    admin_port: int
    # for the app: variable -> value (MESHLING_PROXY_PID is added once the proxy runs)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def admin(self) -> str:
        return host_port(self.admin_host, self.admin_port)


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reachable(address: str) -> str:
    """Where a local client reaches a listener bound to `address`."""
    if address in ("", "0.0.0.0"):
        return "127.0.0.1"
    if address == "::":
        return "::1"
    return address


def env_name(prefix: str, name: str) -> str:
    return prefix + re.sub(r"[^A-Z0-9]", "_", name.upper())


def standalone(config: str) -> ProxyPlan:
    """A proxy running the snapshot file `config`."""
    from meshling.snapshot import load

    try:
        snapshot = load(config)
    except SnapshotError as exc:
        raise PlanError(str(exc)) from None
    host, port = reachable(snapshot.admin.address), snapshot.admin.port
    env = {"MESHLING_ADMIN": host_port(host, port)}
    for listener in snapshot.listeners:
        where = host_port(reachable(listener.address), listener.port)
        env[env_name("MESHLING_LISTENER_", listener.name)] = where
    return ProxyPlan(("proxy", "run", "--config", config), host, port, env)


def control_plane(
    cp: str,
    token_file: str | None,
    dataplane: str | None,
    data_dir: str | None,
    cp_ca_file: str | None,
) -> ProxyPlan:
    """A proxy configured by the control planes `cp`, as the Dataplane file describes it."""
    from meshling.agent.settings import (
        DEFAULT_DATA_DIR,
        SettingsError,
        parse_addresses,
        read_dataplane,
    )

    try:
        parse_addresses(cp)
    except SettingsError as exc:
        raise PlanError(str(exc)) from None
    if not token_file:
        raise PlanError("--cp needs --token-file FILE (env MESHLING_TOKEN_FILE)")
    if not dataplane:
        raise PlanError("--cp needs --dataplane FILE (env MESHLING_DATAPLANE)")
    try:
        _, resource = read_dataplane(dataplane)
    except SnapshotError as exc:
        raise PlanError(str(exc)) from None
    args = ["proxy", "run", "--cp", cp, "--token-file", token_file, "--dataplane", dataplane]
    args += ["--data-dir", data_dir or DEFAULT_DATA_DIR]
    if cp_ca_file:
        args += ["--cp-ca-file", cp_ca_file]
    host, port = "127.0.0.1", int(resource.admin_port)
    env = {"MESHLING_ADMIN": host_port(host, port)}
    for outbound in resource.outbounds:
        env[env_name("MESHLING_OUTBOUND_", outbound.service)] = f"127.0.0.1:{outbound.port}"
    return ProxyPlan(tuple(args), host, port, env)


def resolve(
    *,
    config: str | None,
    cp: str | None,
    token_file: str | None,
    dataplane: str | None,
    data_dir: str | None,
    cp_ca_file: str | None,
    environ: Mapping[str, str],
) -> ProxyPlan:
    """The plan for `meshling proxy run`'s options: flags win over the environment."""
    if config is None and cp is None:
        config, cp = environ.get("MESHLING_CONFIG"), environ.get("MESHLING_CP")
        if config and cp:
            raise PlanError(
                "MESHLING_CONFIG and MESHLING_CP are both set; unset one, or choose with "
                "--config or --cp"
            )
    if config:
        return standalone(config)
    if not cp:
        raise PlanError(
            "give --config FILE (a standalone proxy) or --cp URL (configured by a control "
            "plane), then -- and the app's command"
        )
    return control_plane(
        cp,
        token_file or environ.get("MESHLING_TOKEN_FILE"),
        dataplane or environ.get("MESHLING_DATAPLANE"),
        data_dir or environ.get("MESHLING_DATA_DIR"),
        cp_ca_file or environ.get("MESHLING_CP_CA_FILE"),
    )
