"""The FaultInjection resource: delays, aborts and slow responses, for testing callers.

```yaml
kind: FaultInjection
metadata: {name: api-chaos, mesh: default}
spec:
  sources: [{service: web}]              # the callers, by service; {service: "*"}: any
  destinations: [{service: api}]         # the dataplanes whose inbounds inject faults
  conf:
    delay: {percentage: 50, value: 2s}   # hold the request this long before forwarding
    abort: {percentage: 10, http_status: 503}      # or {percentage: 10, tcp_reset: true}
    response_bandwidth: {limit: 10kbps, percentage: 100}   # pace the response
    header: {name: x-chaos, value: "on"} # only requests carrying this header
```

Each fault fires independently for its `percentage` of requests (of connections on a TCP
inbound). An abort answers with `http_status` (the proxy's own reply, `x-meshling-error:
fault_abort`) or resets the connection (`tcp_reset`); on a TCP inbound every abort is a
reset. A delay holds the request (the connection, on TCP) before it is forwarded. The
bandwidth limit paces what is sent back to the caller, in bits per second (`bps`,
`kbps`, `mbps`, `gbps`, powers of 1000). With `header`, faults apply only to HTTP
requests whose header `name` has exactly `value`; such a rule never fires on TCP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshling.policies.inbound import (
    Envelope,
    flag,
    integer,
    parse_envelope,
    percentage,
    positive_duration,
    text,
)

if TYPE_CHECKING:
    from meshling.policies.matching import Selector
    from meshling.snapshot.load import _Node

KIND = "FaultInjection"
CONF_FIELDS = ("delay", "abort", "response_bandwidth", "header")
_BANDWIDTH = re.compile(r"^(\d+(?:\.\d+)?)\s*(bps|kbps|mbps|gbps)$", re.IGNORECASE)
_BANDWIDTH_UNITS = {"bps": 1, "kbps": 1000, "mbps": 1000**2, "gbps": 1000**3}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(frozen=True, slots=True)
class Delay:
    """Hold a request before forwarding it."""

    # of the requests (connections) the rule applies to, 0 to 100
    percentage: float
    # how long, in seconds
    value: float


@dataclass(frozen=True, slots=True)
class Abort:
    """Answer a request with an error instead of forwarding it."""

    # of the requests (connections) the rule applies to, 0 to 100
    percentage: float
    # the status of the proxy's reply; None: reset the connection instead
    http_status: int | None


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """Send the response no faster than `bits_per_second`."""

    # the limit, in bits per second
    bits_per_second: int
    # of the requests (connections) the rule applies to, 0 to 100
    percentage: float = 100.0


@dataclass(frozen=True, slots=True)
class HeaderTrigger:
    """Faults apply only to requests whose header `name` is exactly `value`."""

    # lower-case header name
    name: str
    value: str
    # both as the decoder delivers them, for a comparison without encoding per request
    name_bytes: bytes = field(init=False, repr=False, compare=False)
    value_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name_bytes", self.name.encode())
        object.__setattr__(self, "value_bytes", self.value.encode("latin-1", "replace"))


@dataclass(frozen=True, slots=True)
class FaultConf:
    """What one FaultInjection does (`spec.conf`); at least one of delay, abort,
    response_bandwidth."""

    delay: Delay | None = None
    abort: Abort | None = None
    response_bandwidth: Bandwidth | None = None
    header: HeaderTrigger | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.delay is not None:
            out["delay"] = {"percentage": self.delay.percentage, "value": self.delay.value}
        if self.abort is not None:
            abort: dict[str, Any] = {"percentage": self.abort.percentage}
            if self.abort.http_status is None:
                abort["tcp_reset"] = True
            else:
                abort["http_status"] = self.abort.http_status
            out["abort"] = abort
        if self.response_bandwidth is not None:
            out["response_bandwidth"] = {
                "limit": f"{self.response_bandwidth.bits_per_second}bps",
                "percentage": self.response_bandwidth.percentage,
            }
        if self.header is not None:
            out["header"] = {"name": self.header.name, "value": self.header.value}
        return out


@dataclass(frozen=True, slots=True)
class FaultInjection:
    """A FaultInjection resource: which callers of which dataplanes, and the faults."""

    # unique within the mesh; names the rule in the snapshot, metrics and logs
    name: str
    # the mesh the policy belongs to
    mesh: str
    # the callers, by service ("*": any caller, plaintext ones included)
    sources: tuple[Selector, ...]
    # the dataplanes whose inbounds inject the faults
    destinations: tuple[Selector, ...]
    # the faults
    conf: FaultConf


def parse_resource(document: Any, source: str) -> FaultInjection:
    """Validate a parsed YAML/JSON document and build the FaultInjection it describes."""
    envelope: Envelope
    envelope, conf = parse_envelope(document, source, KIND)
    conf.mapping(CONF_FIELDS)
    return FaultInjection(
        name=envelope.name,
        mesh=envelope.mesh,
        sources=envelope.sources,
        destinations=envelope.destinations,
        conf=parse_conf(conf),
    )


def parse_conf(node: _Node) -> FaultConf:
    """The faults of `node` (its keys already checked against `CONF_FIELDS` and more)."""
    conf = FaultConf(
        delay=node.get("delay", _delay, None),
        abort=node.get("abort", _abort, None),
        response_bandwidth=node.get("response_bandwidth", _bandwidth, None),
        header=node.get("header", _header, None),
    )
    if conf.delay is None and conf.abort is None and conf.response_bandwidth is None:
        raise node.error("give at least one of delay, abort, response_bandwidth")
    return conf


def _delay(node: _Node) -> Delay:
    node.mapping(("percentage", "value"))
    return Delay(
        percentage=node.need("percentage", percentage),
        value=node.need("value", lambda n: positive_duration(n, 3600.0)),
    )


def _abort(node: _Node) -> Abort:
    node.mapping(("percentage", "http_status", "tcp_reset"))
    if node.has("http_status") == node.has("tcp_reset"):
        raise node.error("give exactly one of http_status, tcp_reset")
    if node.has("tcp_reset") and not node.need("tcp_reset", flag):
        raise node.child("tcp_reset").error("must be true (or give http_status instead)")
    return Abort(
        percentage=node.need("percentage", percentage),
        http_status=node.get("http_status", lambda n: integer(n, 200, 599), None),
    )


def _bandwidth_limit(node: _Node) -> int:
    value = node.value
    if isinstance(value, str) and (m := _BANDWIDTH.match(value.strip())):
        bits = float(m.group(1)) * _BANDWIDTH_UNITS[m.group(2).lower()]
    else:
        raise node.error(
            f"invalid bandwidth {value!r}: use a number with bps, kbps, mbps or gbps, "
            "such as 10kbps"
        )
    if bits < 8:
        raise node.error(f"{value!r} is below one byte a second: use at least 8bps")
    if bits > 100 * 1000**3:
        raise node.error(f"{value!r} is above 100gbps: that is no limit")
    return int(bits)


def _bandwidth(node: _Node) -> Bandwidth:
    node.mapping(("limit", "percentage"))
    return Bandwidth(
        bits_per_second=node.need("limit", _bandwidth_limit),
        percentage=node.get("percentage", percentage, 100.0),
    )


def _header(node: _Node) -> HeaderTrigger:
    node.mapping(("name", "value"))
    name = node.need("name", text)
    if not _TOKEN.match(name):
        raise node.child("name").error(f"invalid header name {name!r}")
    if name.lower().startswith("x-meshling-"):
        raise node.child("name").error(
            "x-meshling-* headers are the mesh's own and never reach the proxy from callers"
        )
    value = node.child("value").value
    if not isinstance(value, str):
        raise node.child("value").error(
            'expected a string (quote values such as "on" or "1" in YAML)'
        )
    return HeaderTrigger(name=name.lower(), value=value)
