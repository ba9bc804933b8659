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
    from meshling.proxy.server import run

    return run(args.config)


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


def _demo(args: argparse.Namespace) -> int:
    from meshling.demo.main import run

    return run(args.rest)


def _control_plane_run(args: argparse.Namespace) -> int:
    from meshling.controlplane.api.server import run

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"--listen: expected HOST:PORT, got {args.listen!r}", file=sys.stderr)
        return 2
    return run(args.store, host.strip("[]"), int(port), args.token_file)


def _resources(args: argparse.Namespace) -> int:
    from meshling.controlplane.cli import run

    return run([args.command, *args.rest])


def _ca(args: argparse.Namespace) -> int:
    from meshling.identity.cli import run

    return run(args.rest)


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
        help="run a standalone proxy from a snapshot file",
        description="Run a proxy from a snapshot file. SIGHUP or a change to the file "
        "reloads it; SIGTERM drains and exits.",
    )
    run.add_argument(
        "--config",
        "-c",
        default=os.environ.get("MESHLING_CONFIG"),
        required="MESHLING_CONFIG" not in os.environ,
        help="snapshot file, YAML or JSON (env MESHLING_CONFIG)",
    )
    run.set_defaults(func=_proxy_run)
    validate = proxy_commands.add_parser("validate", help="check a snapshot file and exit")
    validate.add_argument("--config", "-c", required=True, help="snapshot file, YAML or JSON")
    validate.set_defaults(func=_proxy_validate)

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
        help="serve the resource API",
        description="Serve the control plane's REST API over a resource store. The API "
        "needs the admin token, written to --token-file on the first start.",
    )
    cp_run.add_argument(
        "--store",
        default=os.environ.get("MESHLING_STORE", "sqlite://meshling.db"),
        help="sqlite:///PATH (default: meshling.db here) or postgresql://USER@HOST:PORT/DB "
        "(env MESHLING_STORE)",
    )
    cp_run.add_argument(
        "--listen",
        default=os.environ.get("MESHLING_LISTEN", "127.0.0.1:5681"),
        help="HOST:PORT to serve on (env MESHLING_LISTEN)",
    )
    cp_run.add_argument(
        "--token-file",
        default=os.environ.get("MESHLING_TOKEN_FILE", "meshling-admin.token"),
        help="the admin token, created 0600 on the first start (env MESHLING_TOKEN_FILE)",
    )
    cp_run.set_defaults(func=_control_plane_run)

    for name, summary in (
        ("apply", "create or update resources from YAML/JSON files: apply -f FILE|DIR|-"),
        ("get", "show resources: get KIND [NAME] [-o table|yaml|json]"),
        ("delete", "delete a resource: delete KIND NAME"),
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # The demo and the CA commands parse their own options; the rest must be known here.
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("demo", "ca", "apply", "get", "delete"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    _setup_logging(args.log_level)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
