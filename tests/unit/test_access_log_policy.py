"""The AccessLog policy: resource validation (errors name the field), selection, the
chain fragments (golden files) and how the snapshot loader reads them.

Golden files live in `src/meshling/policies/access_log/testdata/`: `<case>.policies.yaml`
holds resources, `<case>.fragments.yaml` the fragment of each (dataplane, chain) of
`CHAINS`. Run with MESHLING_UPDATE_GOLDEN=1 to rewrite them after a deliberate change.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.controlplane.resources import Dataplane, Inbound, Outbound
from meshling.policies import policy_type
from meshling.policies.access_log import AccessLog, fragment, parse_resource, selects
from meshling.policies.access_log.snapshot import parse_sink, sink_document
from meshling.snapshot import SnapshotError
from meshling.snapshot.load import _Node, from_dict
from meshling.snapshot.model import AccessLogBackend

TESTDATA = Path(__file__).parents[2] / "src" / "meshling" / "policies" / "access_log" / "testdata"
CASES = sorted(p.name.removesuffix(".policies.yaml") for p in TESTDATA.glob("*.policies.yaml"))
# (service, tags, destination: None for the inbound chains)
CHAINS = [
    ("web", {"version": "v1"}, "api"),
    ("web", {"version": "v1"}, None),
    ("api", {"version": "v1"}, None),
    ("api", {"version": "v1"}, "db"),
    ("api", {"version": "v2"}, None),
    ("api", {"version": "v2"}, "db"),
]

RESOURCE: dict[str, Any] = {
    "kind": "AccessLog",
    "metadata": {"name": "web-calls", "mesh": "default"},
    "spec": {
        "dataplanes": [{"service": "web"}],
        "to": [{"service": "api"}],
        "backends": [{"stdout": True, "format": "text"}],
    },
}


def resources(case: str) -> list[AccessLog]:
    path = TESTDATA / f"{case}.policies.yaml"
    with path.open(encoding="utf-8") as f:
        return [parse_resource(d, str(path)) for d in yaml.safe_load_all(f) if d]


def error(change: Any) -> SnapshotError:
    document = copy.deepcopy(RESOURCE)
    change(document["spec"])
    with pytest.raises(SnapshotError) as caught:
        parse_resource(document, "log.yaml")
    return caught.value


@pytest.mark.parametrize("case", CASES)
def test_access_log_policy_fragments_golden(case: str) -> None:
    found = {
        f"{service} {tags['version']} {destination or 'inbound'}": fragment(
            resources(case), "default", (service, tags), destination
        ).get("access_log", [])
        for service, tags, destination in CHAINS
    }
    golden = TESTDATA / f"{case}.fragments.yaml"
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        golden.write_text(yaml.safe_dump(found, sort_keys=False, width=100))
    assert found == yaml.safe_load(golden.read_text())
    # every fragment is a chain's `access_log` the loader takes, and writes back the same
    for sinks in found.values():
        node = _Node("fragment.yaml", "access_log", sinks)
        parsed = [parse_sink(node.child(i), chain=True) for i in range(len(sinks))]
        assert [sink_document(s) for s in parsed] == sinks


def test_access_log_policy_golden_case_is_not_trivial() -> None:
    golden = yaml.safe_load((TESTDATA / "mixed.fragments.yaml").read_text())
    assert golden["web v1 api"][0]["file"] == "/var/log/meshling/web.log"
    assert golden["web v1 inbound"] == []
    assert golden["api v1 inbound"][0]["identities"] == [
        "spiffe://default/web",
        "spiffe://default/batch",
    ]
    assert golden["api v1 db"] == []
    assert [s["name"] for s in golden["api v2 inbound"]] == ["api-from-web"] + [
        "api-v2-everything"
    ] * 2
    assert golden["api v2 inbound"][1]["identities"] == ["*"]


def test_access_log_policy_is_registered_at_listener() -> None:
    policy = policy_type("AccessLog")
    assert policy is not None and policy.attach == "listener" and policy.key == "access_log"
    assert policy.parse_resource is parse_resource


def test_access_log_policy_selects_dataplanes_by_service_and_tags() -> None:
    (_, _, v2, _) = resources("mixed")
    inbounds = (Inbound(15006, 8080, "http"),)
    planes = [
        Dataplane("api-1", "default", "api", "10.0.0.1", inbounds, tags={"version": "v1"}),
        Dataplane(
            "api-2",
            "default",
            "api",
            "10.0.0.2",
            inbounds,
            (Outbound(15002, "db", "tcp"),),
            tags={"version": "v2"},
        ),
        Dataplane("api-9", "other", "api", "10.0.0.3", tags={"version": "v2"}),
    ]
    selection = selects(v2, planes)
    assert selection.dataplanes == ("api-2",) and selection.field == "spec.dataplanes"
    assert "service api, version=v2" in selection.wanted


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (lambda s: s.pop("to"), "spec", "give `to`"),
        (
            lambda s: s.update(to=[{"service": "api", "tags": {"v": "1"}}]),
            "spec.to[0].tags",
            "without tags",
        ),
        (
            lambda s: s.update({"from": [{"service": "web", "tags": {"v": "1"}}]}),
            "spec.from[0].tags",
            "without tags",
        ),
        (lambda s: s.update(backends=[]), "spec.backends", "non-empty list"),
        (
            lambda s: s.update(backends=[{"format": "text"}]),
            "spec.backends[0]",
            "exactly one backend",
        ),
        (
            lambda s: s.update(backends=[{"stdout": True, "file": "/x"}]),
            "spec.backends[0]",
            "exactly one backend",
        ),
        (
            lambda s: s["backends"][0].update(template="%RESPONSE_CODE% %NOPE%"),
            "spec.backends[0].template",
            "%NOPE%: unknown placeholder",
        ),
        (
            lambda s: s["backends"][0].update(template="50% off"),
            "spec.backends[0].template",
            "not closed",
        ),
        (
            lambda s: s["backends"][0].update(fields=["status"]),
            "spec.backends[0].fields",
            "fields are for format: json",
        ),
        (
            lambda s: s.update(backends=[{"stdout": True, "fields": ["status", "nope"]}]),
            "spec.backends[0].fields[1]",
            "unknown access log field",
        ),
        (
            lambda s: s.update(
                backends=[{"stdout": True, "fields": [{"key": "a", "value": "%X%"}]}]
            ),
            "spec.backends[0].fields[0].value",
            "%X%: unknown placeholder",
        ),
        (
            lambda s: s.update(backends=[{"stdout": True, "fields": ["status", "status"]}]),
            "spec.backends[0].fields[1]",
            "given twice",
        ),
        (
            lambda s: s.update(backends=[{"stdout": True, "template": "%START_TIME%"}]),
            "spec.backends[0].template",
            "format: text",
        ),
        (
            lambda s: s.update(backends=[{"tcp": "127.0.0.1"}]),
            "spec.backends[0].tcp",
            "expected HOST:PORT",
        ),
        (
            lambda s: s.update(backends=[{"tcp": "127.0.0.1:70000"}]),
            "spec.backends[0].tcp",
            "invalid port",
        ),
        (
            lambda s: s.update(backends=[{"tcp": "bad host:80"}]),
            "spec.backends[0].tcp",
            "invalid collector host",
        ),
        (
            lambda s: s.update(backends=[{"stdout": True, "max_pending": 0}]),
            "spec.backends[0].max_pending",
            "out of range",
        ),
        (lambda s: s.update(backends=[{"path": "-"}]), "spec.backends[0].path", "unknown field"),
        (lambda s: s.update(sources=[{"service": "web"}]), "spec.sources", "unknown field"),
    ],
)
def test_access_log_policy_errors_name_the_field(change: Any, field: str, reason: str) -> None:
    caught = error(change)
    assert caught.path == field and reason in caught.reason, caught
    assert caught.source == "log.yaml"


def test_access_log_policy_snapshot_chain_sinks_and_the_legacy_access_log() -> None:
    document = {
        "version": "1",
        "access_log": {"path": "-", "format": "text"},
        "listeners": [
            {
                "name": "out",
                "port": 0,
                "filter_chains": [
                    {
                        "tcp": {"cluster": "db"},
                        "access_log": [
                            {"tcp": "127.0.0.1:5170", "fields": ["status"]},
                            {"file": "/tmp/x.log", "format": "text", "identities": ["*"]},
                        ],
                    }
                ],
            }
        ],
        "clusters": [{"name": "db", "endpoints": []}],
    }
    snapshot = from_dict(document, "snap.yaml")
    assert snapshot.access_log is not None
    assert snapshot.access_log.backend == AccessLogBackend("stdout")
    assert snapshot.access_log.format == "text" and snapshot.access_log.template is None
    first, second = snapshot.listeners[0].filter_chains[0].access_log
    assert first.backend == AccessLogBackend("tcp", host="127.0.0.1", port=5170)
    assert first.fields == (("status", None),) and first.backend.label == "tcp:127.0.0.1:5170"
    assert second.backend.label == "file:/tmp/x.log"
    bad = copy.deepcopy(document)
    bad["listeners"][0]["filter_chains"][0]["access_log"][1]["template"] = "%REQ(:NOPE)%"
    with pytest.raises(SnapshotError) as caught:
        from_dict(bad, "snap.yaml")
    assert caught.value.path == "listeners[0].filter_chains[0].access_log[1].template"
    assert "%REQ(:NOPE)%: unknown pseudo-header" in caught.value.reason
    bad = copy.deepcopy(document)
    bad["listeners"][0]["filter_chains"][0]["access_log"] = {"stdout": True}
    with pytest.raises(SnapshotError, match="expected a list of sinks"):
        from_dict(bad, "snap.yaml")
