"""`meshling transparent install|uninstall`: the capture rules of one host (or namespace).

Imports only the standard library until a command runs, since the parser is built for
every meshling command, the proxy's among them.
"""

from __future__ import annotations

import argparse
import pwd
import sys

DEFAULT_PROXY_USER = "meshling-proxy"


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `transparent` and its subcommands to the top-level subparsers."""
    parser = commands.add_parser(
        "transparent",
        help="capture an app's traffic into its proxy (iptables)",
        description="Install or remove the iptables nat rules that hand an app's outbound "
        "TCP (and its inbound ports, and DNS when asked) to its proxy, so that an "
        "unmodified app uses the mesh. Run it as root in the app's host or namespace.",
    )
    sub = parser.add_subparsers(dest="transparent_command", required=True)
    install = sub.add_parser(
        "install",
        help="install the capture rules (again: replaces them, no duplicates)",
    )
    install.add_argument(
        "--proxy-user",
        default=DEFAULT_PROXY_USER,
        help="the user (name or uid) the proxy runs as: its traffic is never captured "
        f"(default {DEFAULT_PROXY_USER})",
    )
    install.add_argument("--outbound-port", type=int, default=15001,
                         help="the proxy's transparent outbound port (default 15001)")  # fmt: skip
    install.add_argument("--inbound-port", type=int, default=15006,
                         help="the proxy's port for captured inbound traffic (default 15006)")  # fmt: skip
    install.add_argument(
        "--inbound-ports",
        default="*",
        help="the app's ports whose inbound connections are captured, comma-separated; "
        "'*' every port, '' none (default '*')",
    )
    install.add_argument("--exclude-inbound-ports", default="", metavar="PORTS",
                         help="inbound ports never captured, comma-separated (e.g. 22)")  # fmt: skip
    install.add_argument("--exclude-outbound-ports", default="", metavar="PORTS",
                         help="destination ports never captured, comma-separated")  # fmt: skip
    install.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDRS",
                         help="destinations never captured, comma-separated")  # fmt: skip
    install.add_argument("--exclude-inbound-cidrs", default="", metavar="CIDRS",
                         help="sources whose connections are never captured, comma-separated")  # fmt: skip
    install.add_argument("--admin-port", type=int, default=9901,
                         help="the proxy's admin port, never captured (default 9901)")  # fmt: skip
    install.add_argument(
        "--redirect-dns-port",
        type=int,
        metavar="PORT",
        help="also redirect the app's DNS (UDP and TCP port 53) to this port of the proxy",
    )
    for command in (install, sub.add_parser("uninstall", help="remove every meshling rule")):
        command.add_argument(
            "--dry-run",
            action="store_true",
            help="print the iptables-restore document instead of applying it",
        )
        command.add_argument("--iptables", default="iptables",
                             help="the iptables program (default iptables)")  # fmt: skip
        command.set_defaults(func=run)


def _uid(user: str) -> int:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(
            f"--proxy-user: no user {user!r} on this host; create it (useradd -r {user}) "
            "or give a uid"
        ) from None


def _cidrs(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def run(args: argparse.Namespace) -> int:
    from meshling.transparent import iptables
    from meshling.transparent.rules import (
        CaptureError,
        CaptureSettings,
        capture_rules,
        install_document,
        parse_ports,
        uninstall_document,
    )

    def current() -> str:
        # a dry run shows what would change here; without iptables, a clean table
        try:
            return iptables.listing(args.iptables)
        except iptables.IptablesError:
            return ""

    try:
        if args.transparent_command == "uninstall":
            if args.dry_run:
                print(uninstall_document(current()) or "# nothing of meshling's is installed")
                return 0
            done = iptables.uninstall(args.iptables)
            print("removed meshling's rules" if done else "nothing of meshling's was installed")
            return 0
        inbound = args.inbound_ports.strip()
        settings = CaptureSettings(
            proxy_uid=_uid(args.proxy_user),
            outbound_port=args.outbound_port,
            inbound_port=args.inbound_port,
            capture_inbound=inbound != "",
            inbound_ports=() if inbound in ("*", "") else parse_ports(inbound, "--inbound-ports"),
            exclude_inbound_ports=parse_ports(
                args.exclude_inbound_ports, "--exclude-inbound-ports"
            ),
            exclude_outbound_ports=parse_ports(
                args.exclude_outbound_ports, "--exclude-outbound-ports"
            ),
            exclude_outbound_cidrs=_cidrs(args.exclude_outbound_cidrs),
            exclude_inbound_cidrs=_cidrs(args.exclude_inbound_cidrs),
            admin_port=args.admin_port,
            dns_port=args.redirect_dns_port,
        )
        if args.dry_run:
            listing = current()
            print(
                install_document(settings, listing) if listing else capture_rules(settings), end=""
            )
            return 0
        iptables.install(settings, args.iptables)
        print("installed meshling's capture rules (iptables -t nat -S shows them)")
        return 0
    except (CaptureError, ValueError) as exc:
        print(f"meshling transparent: {exc}", file=sys.stderr)
        return 2
    except iptables.IptablesError as exc:
        print(f"meshling transparent: {exc}", file=sys.stderr)
        return 1
