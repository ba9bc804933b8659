"""The `meshling` command line.

Subcommands import what they need when they run, so `meshling proxy run` never
loads code that only other subcommands use.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from meshling import __version__


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _proxy_run(args: argparse.Namespace) -> int:
    # Flags win over the environment; --config and --cp choose the mode.
    config = args.config
    cp = args.cp
    if config is None and cp is None:
        config, cp = os.environ.get("MESHLING_CONFIG"), os.environ.get("MESHLING_CP")
        if config and cp:
            print(
                "meshling proxy run: MESHLING_CONFIG and MESHLING_CP are both set; "
                "unset one, or choose with --config or --cp",
                file=sys.stderr,
            )
            return 2
    if config:
        from meshling.proxy.server import run

        return run(config)
    if not cp:
        print(
            "meshling proxy run: give --config FILE (a standalone proxy) or --cp URL "
            "(configured by a control plane)",
            file=sys.stderr,
        )
        return 2
    return _proxy_run_cp(args, cp)


def _proxy_run_cp(args: argparse.Namespace, cp: str) -> int:
    from meshling.agent.settings import (
        DEFAULT_DATA_DIR,
        AgentSettings,
        SettingsError,
        parse_addresses,
    )

    token_file = args.token_file or os.environ.get("MESHLING_TOKEN_FILE")
    dataplane = args.dataplane or os.environ.get("MESHLING_DATAPLANE")
    data_dir = args.data_dir or os.environ.get("MESHLING_DATA_DIR") or DEFAULT_DATA_DIR
    cp_ca_file = args.cp_ca_file or os.environ.get("MESHLING_CP_CA_FILE")
    try:
        addresses = parse_addresses(cp)
        if not token_file:
            raise SettingsError("--cp needs --token-file FILE (env MESHLING_TOKEN_FILE)")
        if not dataplane:
            raise SettingsError("--cp needs --dataplane FILE (env MESHLING_DATAPLANE)")
    except SettingsError as exc:
        print(f"meshling proxy run: {exc}", file=sys.stderr)
        return 2
    from meshling.agent.agent import run

    return run(AgentSettings(addresses, token_file, dataplane, data_dir, cp_ca_file))


def _proxy_validate(args: argparse.Namespace) -> int:
    from meshling.snapshot import SnapshotError, load

    try:
        snapshot = load(args.config)
    except SnapshotError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 2
    print(
        f"valid: {args.config}: snapshot {snapshot.version}, "
        f"{len(snapshot.listeners)} listeners, {len(snapshot.clusters)} clusters"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from meshling.runner.command import run

    return run(args)


def _demo(args: argparse.Namespace) -> int:
    from meshling.demo.main import run

    return run(args.rest)


def _control_plane_run(args: argparse.Namespace) -> int:
    from meshling.controlplane.api.server import run

    host, port = args.host, args.port
    if args.listen:
        host, _, raw_port = args.listen.rpartition(":")
        if not host or not raw_port.isdigit():
            print(f"--listen: expected HOST:PORT, got {args.listen!r}", file=sys.stderr)
            return 2
        port = int(raw_port)
    data_dir = args.data_dir
    store = args.store or f"sqlite://{os.path.join(data_dir, 'meshling.db')}"
    token_file = args.token_file or os.path.join(data_dir, "admin.token")
    if args.offline_after <= 0:
        print("--offline-after: must be a positive number of seconds", file=sys.stderr)
        return 2
    if not args.stats_interval >= 1:
        print("--stats-interval: must be at least 1 second", file=sys.stderr)
        return 2
    if not (args.store and args.token_file):  # something lives in the data directory
        try:
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            print(f"--data-dir: cannot create {data_dir}: {exc}", file=sys.stderr)
            return 1
    return run(
        store,
        host.strip("[]"),
        port,
        token_file,
        default_mesh=args.mesh or None,
        mesh_mtls=args.mesh_mtls,
        replica=args.replica_id,
        offline_after=args.offline_after,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        stats_interval=args.stats_interval,
    )


def _resources(args: argparse.Namespace) -> int:
    from meshling.controlplane.cli import run

    return run([args.command, *args.rest])


def _ca(args: argparse.Namespace) -> int:
    from meshling.identity.cli import run

    return run(args.rest)


def _proxy_options(parser: argparse.ArgumentParser) -> None:
    """The options that make a proxy: `meshling proxy run` and `meshling run` share them."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--config",
        "-c",
        help="snapshot file, YAML or JSON, for a standalone proxy (env MESHLING_CONFIG)",
    )
    mode.add_argument(
        "--cp",
        metavar="URL[,URL...]",
        help="control-plane addresses, http(s)://HOST:PORT, tried in turn (env MESHLING_CP)",
    )
    parser.add_argument(
        "--token-file",
        help="with --cp: the dataplane token, from `meshling token dataplane` "
        "(env MESHLING_TOKEN_FILE)",
    )
    parser.add_argument(
        "--dataplane",
        help="with --cp: this proxy's Dataplane resource, YAML or JSON (env MESHLING_DATAPLANE)",
    )
    parser.add_argument(
        "--data-dir",
        help="with --cp: where the snapshot and credentials are cached, made 0700 "
        "(env MESHLING_DATA_DIR; default ./meshling-proxy)",
    )
    parser.add_argument(
        "--cp-ca-file",
        help="with an https:// --cp: the CA certificates (PEM) that vouch for the control "
        "plane's server certificate (env MESHLING_CP_CA_FILE; default the system's)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshling", description="A lightweight service mesh.")
    parser.add_argument("--version", action="version", version=f"meshling {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MESHLING_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (env MESHLING_LOG_LEVEL)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    proxy = commands.add_parser("proxy", help="the data-plane proxy")
    proxy_commands = proxy.add_subparsers(dest="proxy_command", required=True)
    run = proxy_commands.add_parser(
        "run",
        help="run a proxy, standalone from a snapshot file or configured by a control plane",
        description="Run a proxy. Standalone (--config): from a snapshot file; SIGHUP or "
        "a change to the file reloads it. With a control plane (--cp): the control plane "
        "issues its certificate and pushes its snapshots, cached in --data-dir so that it "
        "starts and serves while no control plane answers. SIGTERM drains and exits.",
    )
    _proxy_options(run)
    run.set_defaults(func=_proxy_run)
    validate = proxy_commands.add_parser("validate", help="check a snapshot file and exit")
    validate.add_argument("--config", "-c", required=True, help="snapshot file, YAML or JSON")
    validate.set_defaults(func=_proxy_validate)

    app_run = commands.add_parser(
        "run",
        help="run an app next to its proxy: run [proxy options] -- APP ARGS...",
        description="Start a proxy (the options of `meshling proxy run`), wait until it is "
        "ready, then run the app with MESHLING_ADMIN and the proxy's addresses in its "
        "environment. Signals go to the app; when it exits the proxy drains, and meshling "
        "run exits with the app's code. Exit 70: the proxy exited before it was ready; 71: "
        "not ready in time; 72: the proxy exited while the app ran (the app was stopped); "
        "2: bad options or files.",
    )
    _proxy_options(app_run)
    app_run.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long the proxy may take to answer GET /ready with 200 (default 60)",
    )
    app_run.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="after the app exits, how long the proxy may drain before it is killed (default 30)",
    )
    app_run.add_argument(
        "--app-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="when the proxy dies, how long the app has after SIGTERM before SIGKILL (default 10)",
    )
    app_run.add_argument(
        "--proxy-log",
        metavar="FILE",
        help="append the proxy's output to FILE (default: stderr)",
    )
    app_run.add_argument("app", nargs=argparse.REMAINDER, help="-- APP ARGS...")
    app_run.set_defaults(func=_run)

    demo = commands.add_parser(
        "demo",
        help="run a sample mesh with live traffic",
        add_help=False,
        description="Run a sample mesh with live traffic; `meshling demo --help` for options.",
    )
    demo.set_defaults(func=_demo)

    cp = commands.add_parser("control-plane", help="the control plane")
    cp_commands = cp.add_subparsers(dest="cp_command", required=True)
    cp_run = cp_commands.add_parser(
        "run",
        help="serve the API and the config stream",
        description="Serve the control plane: the REST API (admin token, written to "
        "--token-file on the first start), the CA and the config stream proxies connect "
        "to (dataplane tokens). Replicas on one PostgreSQL store share everything, "
        "the CA and the token signing key included.",
    )
    cp_run.add_argument(
        "--data-dir",
        default=os.environ.get("MESHLING_CP_DATA_DIR", "meshling-cp"),
        help="where the default store and admin token live, made 0700 "
        "(env MESHLING_CP_DATA_DIR, default ./meshling-cp)",
    )
    cp_run.add_argument(
        "--store",
        default=os.environ.get("MESHLING_STORE"),
        help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB[?schema=S] "
        "(env MESHLING_STORE, default meshling.db in --data-dir)",
    )
    cp_run.add_argument(
        "--host",
        default=os.environ.get("MESHLING_HOST", "127.0.0.1"),
        help="address to serve on (env MESHLING_HOST, default 127.0.0.1)",
    )
    cp_run.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("MESHLING_PORT", "5681")),
        help="port to serve on (env MESHLING_PORT, default 5681)",
    )
    cp_run.add_argument(
        "--listen",
        default=os.environ.get("MESHLING_LISTEN"),
        help="HOST:PORT, in place of --host and --port (env MESHLING_LISTEN)",
    )
    cp_run.add_argument(
        "--token-file",
        default=os.environ.get("MESHLING_ADMIN_TOKEN_FILE"),
        help="the admin token, created 0600 on the first start "
        "(env MESHLING_ADMIN_TOKEN_FILE, default admin.token in --data-dir)",
    )
    cp_run.add_argument(
        "--mesh",
        default=os.environ.get("MESHLING_MESH", "default"),
        help="a mesh to create on start when it does not exist (env MESHLING_MESH, default "
        "'default'; '' for none)",
    )
    cp_run.add_argument(
        "--mesh-mtls",
        choices=["off", "permissive", "strict"],
        default="off",
        help="mTLS of the mesh --mesh creates (default off, as in Kuma: proxies then need "
        "no certificates; turn it on with `meshling apply`)",
    )
    cp_run.add_argument(
        "--replica-id",
        default=os.environ.get("MESHLING_REPLICA_ID"),
        help="this replica's name in dataplane status (env MESHLING_REPLICA_ID, "
        "default hostname:pid)",
    )
    cp_run.add_argument(
        "--offline-after",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a dataplane whose replica has not refreshed its status for this long is "
        "offline (default 30)",
    )
    cp_run.add_argument(
        "--stats-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often proxies send their golden counters, for `meshling stat` (default 5)",
    )
    cp_run.add_argument(
        "--tls-cert",
        default=os.environ.get("MESHLING_CP_TLS_CERT"),
        help="serve https:// and wss:// with this certificate chain, PEM (env "
        "MESHLING_CP_TLS_CERT); needed whenever proxies reach the control plane over a network",
    )
    cp_run.add_argument(
        "--tls-key",
        default=os.environ.get("MESHLING_CP_TLS_KEY"),
        help="the private key of --tls-cert, PEM (env MESHLING_CP_TLS_KEY)",
    )
    cp_run.set_defaults(func=_control_plane_run)

    for name, summary in (
        ("apply", "create or update resources from YAML/JSON files: apply -f FILE|DIR|-"),
        ("get", "show resources: get KIND [NAME] [-o table|yaml|json]"),
        ("delete", "delete a resource: delete KIND NAME"),
        ("token", "dataplane tokens: token dataplane --service S | token revoke JTI"),
        ("inspect", "a dataplane's stream, snapshot and certificate: inspect dataplane NAME"),
        ("check", "is the mesh healthy: control plane, proxies, certificates"),
        ("stat", "golden metrics of services: stat [SERVICE] [--window 60s] [--by route]"),
        ("tap", "watch a service's requests live: tap SERVICE [--path P] [--status 5xx]"),
        ("explain", "why a request takes its route and is let in: explain SOURCE DESTINATION"),
    ):
        command = commands.add_parser(
            name, help=summary, add_help=False, description=f"{summary}; `--help` for options."
        )
        command.set_defaults(func=_resources)

    ca = commands.add_parser(
        "ca",
        help="the mesh's certificate authority: init, issue, show",
        add_help=False,
        description="Manage a file-based mesh CA; `meshling ca --help` for commands.",
    )
    ca.set_defaults(func=_ca)

    from meshling.transparent.cli import add_commands as add_transparent

    add_transparent(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # The demo and the CA commands parse their own options; the rest must be known here.
    args, rest = parser.parse_known_args(argv)
    forwarded = (
        "demo",
        "ca",
        "apply",
        "get",
        "delete",
        "token",
        "inspect",
        "check",
        "stat",
        "tap",
        "explain",
    )
    if rest and args.command not in forwarded:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    _setup_logging(args.log_level)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
