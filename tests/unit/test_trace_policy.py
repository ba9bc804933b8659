"""The Trace policy: resource validation, its `tracing:` fragment (golden files), which
resource governs a dataplane, and where the builder puts it.

Golden files live in `src/meshling/policies/trace/testdata/`: `<case>.resource.yaml` and
the `tracing:` section it becomes, `<case>.fragment.yaml`. Run with
MESHLING_UPDATE_GOLDEN=1 to rewrite them after a deliberate change, then read the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.controlplane.builder import build
from meshling.controlplane.resources import Dataplane, Inbound, Mesh, Outbound
from meshling.policies import policy_type, registered
from meshling.policies.trace import Trace, fragment, governing, parse_resource, selects
from meshling.snapshot import SnapshotError, from_dict
from meshling.snapshot.load import _Node
from meshling.tracing.config import parse_tracing

TESTDATA = Path(__file__).parents[2] / "src" / "meshling" / "policies" / "trace" / "testdata"
CASES = sorted(p.name.removesuffix(".resource.yaml") for p in TESTDATA.glob("*.resource.yaml"))


def resource(
    name: str, service: str = "*", tags: dict[str, str] | None = None, **conf: Any
) -> Trace:
    selector: dict[str, Any] = {"service": service}
    if tags:
        selector["tags"] = tags
    document = {
        "kind": "Trace",
        "metadata": {"name": name, "mesh": "default"},
        "spec": {
            "dataplanes": [selector],
            "conf": {"backend": {"otlp": {"endpoint": f"http://{name}:4318"}}, **conf},
        },
    }
    return parse_resource(document, f"{name}.yaml")


@pytest.mark.parametrize("case", CASES)
def test_trace_policy_golden_fragments(case: str) -> None:
    path = TESTDATA / f"{case}.resource.yaml"
    trace = parse_resource(yaml.safe_load(path.read_text()), str(path))
    got = fragment([trace], "default", dataplane=("api", {"team": "payments"}))
    golden = TESTDATA / f"{case}.fragment.yaml"
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        golden.write_text(yaml.safe_dump(got, sort_keys=False))
    assert got == yaml.safe_load(golden.read_text())
    # the fragment is a `tracing:` section the proxy reads back into the same conf
    assert parse_tracing(_Node("golden", "tracing", got)) == trace.conf


def test_trace_policy_registered_with_proxy_attach() -> None:
    kind = policy_type("Trace")
    assert kind is not None and kind.attach == "proxy" and kind.key == "tracing"
    assert kind in registered()


@pytest.mark.parametrize(
    ("spec", "path", "reason"),
    [
        ({"conf": {"backend": {"otlp": {"endpoint": "http://x"}}}}, "spec.dataplanes", "required"),
        ({"dataplanes": [{"service": "*"}]}, "spec.conf", "required"),
        ({"dataplanes": [], "conf": {}}, "spec.dataplanes", "non-empty list"),
        ({"dataplanes": [{"service": "*"}], "conf": {}}, "spec.conf.backend", "required"),
        (
            {"dataplanes": [{"service": "*"}], "conf": {"backend": {"zipkin": {}}}},
            "spec.conf.backend.zipkin",
            "unknown field",
        ),
        (
            {"dataplanes": [{"service": "*"}], "conf": {"backend": {"otlp": {"endpoint": "x"}}}},
            "spec.conf.backend.otlp.endpoint",
            "OTLP/HTTP URL",
        ),
        (
            {
                "dataplanes": [{"service": "*"}],
                "conf": {"sampling": -1, "backend": {"otlp": {"endpoint": "http://x"}}},
            },
            "spec.conf.sampling",
            "0 to 100",
        ),
        (
            {
                "dataplanes": [{"service": "*"}],
                "conf": {"propagation": ["x"], "backend": {"otlp": {"endpoint": "http://x"}}},
            },
            "spec.conf.propagation[0]",
            "unknown propagation format",
        ),
    ],
)
def test_trace_policy_errors_name_the_field(spec: dict[str, Any], path: str, reason: str) -> None:
    document = {"kind": "Trace", "metadata": {"name": "t", "mesh": "default"}, "spec": spec}
    with pytest.raises(SnapshotError) as caught:
        parse_resource(document, "t.yaml")
    assert f"t.yaml: {path}" in str(caught.value) or path in str(caught.value)
    assert reason in str(caught.value)


def test_trace_policy_most_specific_governs() -> None:
    everyone = resource("everyone")
    api = resource("api", "api")
    api_v2 = resource("api-v2", "api", {"version": "v2"})
    also_api = resource("aa-api", "api")  # as specific as `api`, sorts first
    pool = [everyone, api, api_v2]
    assert governing(pool, "default", ("web", {})) is everyone
    assert governing(pool, "default", ("api", {"version": "v1"})) is api
    assert governing(pool, "default", ("api", {"version": "v2"})) is api_v2
    assert governing([*pool, also_api], "default", ("api", {})) is also_api
    assert governing(pool, "other", ("api", {})) is None
    assert fragment([api], "default", dataplane=("web", {})) == {}


def dataplane(name: str, service: str, port: int, **tags: str) -> Dataplane:
    return Dataplane(
        name=name,
        mesh="default",
        service=service,
        address="127.0.0.1",
        tags=tags,
        inbounds=(Inbound(port=port, service_port=port + 1000),),
        outbounds=(Outbound(port=port + 1, service="db"),) if service != "db" else (),
        admin_port=port + 2,
    )


def test_trace_policy_builder_puts_tracing_at_the_top() -> None:
    mesh = Mesh(name="default")
    web = dataplane("web-1", "web", 10000)
    api = dataplane("api-1", "api", 11000, version="v2")
    db = dataplane("db-1", "db", 12000)
    policies = [resource("everyone", sampling=1), resource("api-v2", "api", {"version": "v2"})]
    everyone = build(web, mesh, [web, api, db], policies, None)
    assert everyone["tracing"] == {
        "endpoint": "http://everyone:4318/v1/traces",
        "sampling": 1.0,
        "propagation": ["w3c"],
    }
    specific = build(api, mesh, [web, api, db], policies, None)
    assert specific["tracing"]["endpoint"] == "http://api-v2:4318/v1/traces"
    snapshot = from_dict(specific, "api-1")  # what the proxy loads
    assert snapshot.tracing is not None and snapshot.tracing.sampling == 100.0
    # no Trace: no section at all
    assert "tracing" not in build(db, mesh, [web, api, db], policies[1:], None)
    # which dataplanes a change of the policy touches: the ones it selects
    assert selects(policies[1], [web, api, db]).dataplanes == ("api-1",)
    assert selects(policies[0], [web, api, db]).dataplanes == ("api-1", "db-1", "web-1")
