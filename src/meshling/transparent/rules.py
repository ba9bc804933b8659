"""The capture rules: settings in, the iptables nat-table rules that realise them out.

Nothing here runs a command. `capture_rules` writes an `iptables-restore` document for
meshling's own chains and the jumps into them, `removal_commands` reads `iptables -S`
output and says which rules and chains to delete, so both are tested without a kernel
and `--dry-run` prints exactly what an install would apply.

The chains, as Istio's and Kuma's capture names them (the order of the rules matters:
the first that matches decides):

* `MESHLING_OUTPUT` (from OUTPUT): what local processes send. The proxy's own traffic
  (`--uid-owner`) returns first, so its upstream connections and its own DNS queries are
  never captured again (that would loop); then DNS to the responder when asked; then
  loopback, the admin port and the excluded ports and CIDRs return; every other TCP
  connection goes to `MESHLING_REDIRECT`;
* `MESHLING_REDIRECT`: to the proxy's transparent outbound port;
* `MESHLING_INBOUND` (from PREROUTING): what arrives from the network. The excluded
  ports (the proxy's own ports among them: other proxies reach those directly) return;
  the app's ports (all, or those listed) go to `MESHLING_IN_REDIRECT`;
* `MESHLING_IN_REDIRECT`: to the proxy's inbound port.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass

PREFIX = "MESHLING_"
OUTPUT = "MESHLING_OUTPUT"
REDIRECT = "MESHLING_REDIRECT"
INBOUND = "MESHLING_INBOUND"
IN_REDIRECT = "MESHLING_IN_REDIRECT"
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)
# the built-in chains meshling's jumps sit in
BUILTIN = ("PREROUTING", "OUTPUT")
DNS_PORT = 53


class CaptureError(ValueError):
    """Settings that cannot make rules; the message names the option."""


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    """What to capture and where to send it."""

    # the proxy's user id: its traffic is never captured
    proxy_uid: int
    # the proxy's transparent outbound listener
    outbound_port: int = 15001
    # the proxy's inbound listener for redirected inbound traffic
    inbound_port: int = 15006
    # capture inbound connections at all
    capture_inbound: bool = True
    # the app's ports whose inbound connections are captured; empty: every port
    inbound_ports: tuple[int, ...] = ()
    # ports never captured: inbound destination ports, outbound destination ports
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    # destinations never captured (outbound) and sources never captured (inbound)
    exclude_outbound_cidrs: tuple[str, ...] = ()
    exclude_inbound_cidrs: tuple[str, ...] = ()
    # the proxy's admin port (loopback only, but excluded wherever it is called)
    admin_port: int = 9901
    # redirect the app's DNS (UDP and TCP port 53) to this port; None: leave DNS alone
    dns_port: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.proxy_uid < 2**32:
            raise CaptureError(f"--proxy-user: uid {self.proxy_uid} is out of range")
        ports = {
            "--outbound-port": (self.outbound_port,),
            "--inbound-port": (self.inbound_port,),
            "--inbound-ports": self.inbound_ports,
            "--exclude-inbound-ports": self.exclude_inbound_ports,
            "--exclude-outbound-ports": self.exclude_outbound_ports,
            "--admin-port": (self.admin_port,),
            "--redirect-dns-port": () if self.dns_port is None else (self.dns_port,),
        }
        for option, values in ports.items():
            for port in values:
                if not 1 <= port <= 65535:
                    raise CaptureError(f"{option}: port {port} is not in 1-65535")
        for option, cidrs in (
            ("--exclude-outbound-cidrs", self.exclude_outbound_cidrs),
            ("--exclude-inbound-cidrs", self.exclude_inbound_cidrs),
        ):
            for cidr in cidrs:
                network = parse_cidr(cidr, option)
                if network.version != 4:
                    raise CaptureError(f"{option}: {cidr} is IPv6; the rules are IPv4 only")
        if self.outbound_port == self.inbound_port and self.capture_inbound:
            raise CaptureError(
                f"--inbound-port {self.inbound_port} is also --outbound-port: outbound and "
                "inbound connections need listeners of their own"
            )


def parse_cidr(text: str, option: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address or network; the error names the option."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise CaptureError(f"{option}: {text!r} is not an IP address or CIDR") from None


def parse_ports(text: str, option: str) -> tuple[int, ...]:
    """A comma-separated port list ("" for none), in order, without duplicates."""
    ports: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise CaptureError(f"{option}: {item!r} is not a port (1-65535)")
        if int(item) not in ports:
            ports.append(int(item))
    return tuple(ports)


def _ports_match(ports: tuple[int, ...]) -> list[str]:
    """Match on destination ports: `--dport` for one, `multiport` for up to 15."""
    if len(ports) == 1:
        return ["--dport", str(ports[0])]
    return ["-m", "multiport", "--dports", ",".join(str(p) for p in ports)]


def _chunks(ports: tuple[int, ...], size: int = 15) -> list[tuple[int, ...]]:
    # multiport takes at most 15 ports per rule
    return [ports[i : i + size] for i in range(0, len(ports), size)]


def chain_rules(settings: CaptureSettings) -> list[list[str]]:
    """The rules of meshling's chains, then the jumps into them, as `-A` arguments."""
    s = settings
    rules: list[list[str]] = []
    add = rules.append
    # outbound: first the proxy's own traffic, which must never be captured again
    add(["-A", OUTPUT, "-m", "owner", "--uid-owner", str(s.proxy_uid), "-j", "RETURN"])
    if s.dns_port is not None:
        for proto in ("udp", "tcp"):
            add(["-A", OUTPUT, "-p", proto, "--dport", str(DNS_PORT), "-j", "REDIRECT",
                 "--to-ports", str(s.dns_port)])  # fmt: skip
    # loopback: the app's calls to local processes, its proxy's explicit listeners among them
    add(["-A", OUTPUT, "-d", "127.0.0.0/8", "-j", "RETURN"])
    excluded_out = tuple(dict.fromkeys((s.admin_port, *s.exclude_outbound_ports)))
    for chunk in _chunks(excluded_out):
        add(["-A", OUTPUT, "-p", "tcp", *_ports_match(chunk), "-j", "RETURN"])
    for cidr in s.exclude_outbound_cidrs:
        add(["-A", OUTPUT, "-d", str(parse_cidr(cidr, "")), "-j", "RETURN"])
    add(["-A", OUTPUT, "-p", "tcp", "-j", REDIRECT])
    add(["-A", REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(s.outbound_port)])
    if s.capture_inbound:
        own: tuple[int, ...] = (s.inbound_port, s.outbound_port, s.admin_port)
        if s.dns_port is not None:
            own += (s.dns_port,)
        excluded_in = tuple(dict.fromkeys((*own, *s.exclude_inbound_ports)))
        for chunk in _chunks(excluded_in):
            add(["-A", INBOUND, "-p", "tcp", *_ports_match(chunk), "-j", "RETURN"])
        for cidr in s.exclude_inbound_cidrs:
            add(["-A", INBOUND, "-s", str(parse_cidr(cidr, "")), "-j", "RETURN"])
        if s.inbound_ports:
            for chunk in _chunks(s.inbound_ports):
                add(["-A", INBOUND, "-p", "tcp", *_ports_match(chunk), "-j", IN_REDIRECT])
        else:
            add(["-A", INBOUND, "-p", "tcp", "-j", IN_REDIRECT])
        add(["-A", IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports",
             str(s.inbound_port)])  # fmt: skip
    # the jumps, last, so that a chain exists and is full before traffic enters it
    add(["-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT])
    if s.dns_port is not None:
        add(["-A", "OUTPUT", "-p", "udp", "--dport", str(DNS_PORT), "-j", OUTPUT])
    if s.capture_inbound:
        add(["-A", "PREROUTING", "-p", "tcp", "-j", INBOUND])
    return rules


def chains_used(settings: CaptureSettings) -> tuple[str, ...]:
    if settings.capture_inbound:
        return CHAINS
    return (OUTPUT, REDIRECT)


def capture_rules(settings: CaptureSettings) -> str:
    """The `iptables-restore --noflush` document of an install (nat table only).

    Declaring a chain (`:NAME - [0:0]`) creates it, or empties it when it exists, so the
    document is the same whether applied to a clean table or over an earlier install;
    the earlier install's jumps are removed first (`removal_commands`)."""
    lines = ["*nat"]
    lines += [f":{chain} - [0:0]" for chain in chains_used(settings)]
    lines += [shlex.join(rule) for rule in chain_rules(settings)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def removal_commands(listing: str) -> list[list[str]]:
    """What removes every trace of meshling from the nat table, given `iptables -t nat -S`.

    Jumps into meshling's chains from any other chain are deleted (each `-A` becomes a
    `-D` of the same rule), then meshling's chains are flushed and deleted. Every other
    rule is left as it is. An empty list: nothing of meshling's is installed."""
    deletes: list[list[str]] = []
    chains: list[str] = []
    for line in listing.splitlines():
        words = shlex.split(line)
        if len(words) >= 2 and words[0] == "-N" and words[1].startswith(PREFIX):
            chains.append(words[1])
        elif len(words) >= 2 and words[0] == "-A" and not words[1].startswith(PREFIX):
            target = words[words.index("-j") + 1] if "-j" in words[:-1] else ""
            if target.startswith(PREFIX):
                deletes.append(["-D", *words[1:]])
    return deletes + [["-F", chain] for chain in chains] + [["-X", chain] for chain in chains]


def install_document(settings: CaptureSettings, listing: str = "") -> str:
    """The one `iptables-restore --noflush` document that installs the rules over
    whatever `listing` (`iptables -t nat -S`) shows: an earlier install's jumps are
    deleted in the same transaction, so installing twice leaves one copy of each rule."""
    deletes = [shlex.join(c) for c in removal_commands(listing) if c[0] == "-D"]
    # a chain of an earlier install that this one does not use (inbound capture off now)
    used = chains_used(settings)
    stale = [c[1] for c in removal_commands(listing) if c[0] == "-X" and c[1] not in used]
    document = capture_rules(settings).splitlines()
    body = [*deletes, *document[1 + len(used) : -1]]
    body += [f"-F {chain}" for chain in stale] + [f"-X {chain}" for chain in stale]
    return "\n".join([document[0], *document[1 : 1 + len(used)], *body, "COMMIT"]) + "\n"


def uninstall_document(listing: str) -> str | None:
    """The `iptables-restore --noflush` document that removes meshling's rules and chains
    (`removal_commands`); None when nothing of meshling's is installed."""
    commands = removal_commands(listing)
    if not commands:
        return None
    return "\n".join(["*nat", *(shlex.join(c) for c in commands), "COMMIT"]) + "\n"
