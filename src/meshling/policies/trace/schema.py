"""The Trace resource: which proxies trace requests, how many, and where spans go.

```yaml
kind: Trace
metadata: {name: everyone, mesh: default}
spec:
  dataplanes: [{service: "*"}]      # the proxies that trace (tags narrow them)
  conf:
    sampling: 1                     # percent of new traces kept, 0 to 100 (default 100)
    backend:
      otlp: {endpoint: http://otel-collector:4318/v1/traces}
    propagation: [w3c, b3multi]     # written besides W3C, which is always (default [w3c])
    tags:                           # custom span attributes
      - {name: team, literal: payments}
      - {name: tenant, header: {name: x-tenant, default: none}}
```

Like Kuma's MeshTrace, a Trace configures a whole proxy: its inbound (SERVER spans) and
outbound (CLIENT spans) traffic alike. Where several select one dataplane, the most
specific governs alone (a named service beats `"*"`, then more tags, then the name that
sorts first), as for the traffic policies. The conf is the snapshot's `tracing:`
section (`tracing.config`), with the backend spelled out; errors name the field path
(`spec.conf.backend.otlp.endpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshling.policies.matching import Selector
    from meshling.snapshot.load import _Node
    from meshling.snapshot.model import Tracing

KIND = "Trace"


@dataclass(frozen=True, slots=True)
class Trace:
    """A Trace resource: the proxies it selects and their tracing."""

    # unique within the mesh
    name: str
    # the mesh the policy belongs to
    mesh: str
    # the dataplanes whose proxies trace
    dataplanes: tuple[Selector, ...]
    # what they do: sampling, the OTLP endpoint, the formats written, custom tags
    conf: Tracing


def parse_conf(node: _Node) -> Tracing:
    """`spec.conf`: the snapshot section's fields, the endpoint under `backend.otlp`."""
    from meshling.snapshot.model import Tracing
    from meshling.tracing import config

    node.mapping(("sampling", "backend", "propagation", "tags"))
    backend = node.need("backend", lambda n: n.mapping(("otlp",)))
    otlp = backend.need("otlp", lambda n: n.mapping(("endpoint",)))
    return Tracing(
        endpoint=otlp.need("endpoint", config.endpoint),
        sampling=node.get("sampling", config.sampling, 100.0),
        propagation=node.get("propagation", config.propagation, ("w3c",)),
        tags=node.get("tags", config.tags, ()),
    )


def parse_resource(document: Any, source: str) -> Trace:
    """Validate a parsed YAML/JSON document and build the Trace it describes."""
    from meshling.policies.matching import parse_proxy_policy

    name, mesh, spec, dataplanes = parse_proxy_policy(document, source, KIND, ("conf",))
    conf = spec.need("conf", parse_conf)
    return Trace(name, mesh, dataplanes, conf)
