"""The AccessLog resource: which proxies log which traffic, where and how.

```yaml
kind: AccessLog
metadata: {name: web-calls, mesh: default}
spec:
  dataplanes: [{service: web}]   # the proxies that write the log (tags narrow them)
  to: [{service: api}]           # their outbound traffic to these services ("*": any)
  from: [{service: "*"}]         # their inbound traffic from these callers ("*": any)
  backends:                      # every record goes to each of them
    - file: /var/log/meshling/web.log
      format: text
      template: '[%START_TIME%] %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE%'
    - tcp: 127.0.0.1:5170
      format: json
      fields: [start_time, status, source_service, {key: ua, value: "%REQ(USER-AGENT)%"}]
      max_pending: 10000
```

Like Kuma's MeshAccessLog, the resource selects dataplanes, and within them traffic: at
least one of `to` (outbound, by destination service, without tags: an outbound listener
reaches every instance) and `from` (inbound, by caller service, without tags: the proxy
knows a caller by its SPIFFE ID only). Several AccessLogs may select the same traffic:
unlike the traffic policies, none is more specific, each adds its backends. A backend is
a sink (`policies.access_log.snapshot.parse_sink`), its template checked here so that a
typo in a placeholder is refused at apply time. Errors name the field path
(`spec.backends[1].template`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshling.policies.access_log.snapshot import parse_sink
from meshling.snapshot.model import AccessLog as Sink

if TYPE_CHECKING:
    from meshling.policies.matching import Selector

KIND = "AccessLog"


@dataclass(frozen=True, slots=True)
class AccessLog:
    """An AccessLog resource: the proxies, the traffic in them, and the sinks."""

    # unique within the mesh; names the sinks in snapshots
    name: str
    # the mesh the policy belongs to
    mesh: str
    # the dataplanes whose proxies write the log
    dataplanes: tuple[Selector, ...]
    # outbound traffic to these services (empty: no outbound traffic)
    to: tuple[Selector, ...]
    # inbound traffic from these callers (empty: no inbound traffic)
    from_: tuple[Selector, ...]
    # where each record goes, and in which format
    backends: tuple[Sink, ...]


def parse_resource(document: Any, source: str) -> AccessLog:
    """Validate a parsed YAML/JSON document and build the AccessLog it describes."""
    from meshling.policies.matching import parse_proxy_policy, parse_selectors, refuse_tags

    fields = ("to", "from", "backends")
    name, mesh, spec, dataplanes = parse_proxy_policy(document, source, KIND, fields)
    none: tuple[Selector, ...] = ()
    to = spec.get("to", lambda n: parse_selectors(n, mesh), none)
    from_ = spec.get("from", lambda n: parse_selectors(n, mesh), none)
    if not to and not from_:
        raise spec.error(
            'give `to` (outbound traffic, e.g. [{service: "*"}]) and/or `from` (inbound)'
        )
    for field, selectors, why in (
        ("to", to, "an outbound listener reaches every instance of a service"),
        ("from", from_, "a proxy knows a caller by its service identity only"),
    ):
        refuse_tags(spec, field, selectors, f"select by service, without tags: {why}")
    backends_node = spec.child("backends")
    if not isinstance(backends_node.value, list) or not backends_node.value:
        raise backends_node.error(
            "expected a non-empty list of backends such as {stdout: true, format: text}"
        )
    backends = tuple(parse_sink(backends_node.child(i)) for i in range(len(backends_node.value)))
    return AccessLog(name, mesh, dataplanes, to, from_, backends)
