"""TrafficPermission: resource validation, conversion to the authz fragment (golden
files), the fragment's own validation, and the per-connection decision.

Golden files live in `src/meshling/policies/traffic_permission/testdata/`:
`<case>.policies.yaml` holds resources (several YAML documents), and
`<case>.<service>.authz.yaml` the `to_dict()` form of `to_snapshot(resources, service,
"default")`. Run with MESHLING_UPDATE_GOLDEN=1 to rewrite the outputs after a deliberate
change, then read the diff.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.policies import POLICIES, policy_type
from meshling.policies.traffic_permission import (
    AuthzConfig,
    AuthzRule,
    Decision,
    Destination,
    Rule,
    Source,
    TrafficPermission,
    decide,
    parse_resource,
    to_snapshot,
)
from meshling.policies.traffic_permission.schema import Action
from meshling.snapshot import SnapshotError
from meshling.snapshot.load import _Node

TESTDATA = (
    Path(__file__).parents[2] / "src" / "meshling" / "policies" / "traffic_permission" / "testdata"
)
MESH = "default"
GOLDEN = [
    ("web-to-api", "api"),
    ("web-to-api", "web"),  # selected by nothing: no rules, default deny
    ("merge", "api"),
    ("merge", "db"),
    ("merge", "web"),
    ("shadow", "api"),
]


def load_policies(case: str) -> list[TrafficPermission]:
    path = TESTDATA / f"{case}.policies.yaml"
    with path.open(encoding="utf-8") as f:
        return [parse_resource(doc, str(path)) for doc in yaml.safe_load_all(f)]


def authz_node(document: Any) -> _Node:
    # the path the snapshot loader gives a filter chain's authz field
    return _Node("snap.yaml", "listeners[0].filter_chains[0].authz", document)


def resource() -> dict[str, Any]:
    return {
        "kind": "TrafficPermission",
        "metadata": {"name": "web-to-api", "mesh": "default"},
        "spec": {
            "destination": {"service": "api"},
            "rules": [
                {
                    "action": "allow",
                    "sources": [
                        {"service": "web"},
                        {"identity": "spiffe://default/ops/*"},
                        {"service": "*"},
                    ],
                }
            ],
            "shadow": False,
        },
    }


# -- golden files: resources -> fragment


@pytest.mark.parametrize(("case", "service"), GOLDEN, ids=[f"{c}.{s}" for c, s in GOLDEN])
def test_to_snapshot_matches_golden(case: str, service: str) -> None:
    config = to_snapshot(load_policies(case), service, MESH)
    golden = TESTDATA / f"{case}.{service}.authz.yaml"
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        header = (
            f"# to_snapshot({case}.policies.yaml, destination_service={service!r}, mesh={MESH!r})\n"
        )
        golden.write_text(header + yaml.safe_dump(config.to_dict(), sort_keys=False))
    expected = yaml.safe_load(golden.read_text(encoding="utf-8"))
    assert config.to_dict() == expected


@pytest.mark.parametrize(("case", "service"), GOLDEN, ids=[f"{c}.{s}" for c, s in GOLDEN])
def test_authz_config_from_dict_reads_golden(case: str, service: str) -> None:
    golden = yaml.safe_load((TESTDATA / f"{case}.{service}.authz.yaml").read_text())
    assert AuthzConfig.from_dict(authz_node(golden)) == to_snapshot(
        load_policies(case), service, MESH
    )


def test_to_snapshot_merge_order_ignores_input_order() -> None:
    policies = load_policies("merge")
    forward = to_snapshot(policies, "api", MESH)
    assert to_snapshot(policies[::-1], "api", MESH) == forward
    assert [r.name for r in forward.rules] == [
        "api-no-batch/0",
        "api-ops/0",
        "a-deny-legacy/0",
        "mesh-wide/0",
    ]


def test_to_snapshot_other_mesh_selects_its_own() -> None:
    config = to_snapshot(load_policies("merge"), "api", "staging")
    assert config.to_dict()["rules"] == [
        {
            "name": "api-no-batch/0",
            "action": "allow",
            "identities": ["spiffe://staging/batch"],
            "prefixes": [],
            "shadow": False,
        }
    ]


# -- the resource


def test_parse_resource_builds_the_resource() -> None:
    assert parse_resource(resource(), "p.yaml") == TrafficPermission(
        name="web-to-api",
        mesh="default",
        destination=Destination(service="api"),
        rules=(
            Rule(
                action="allow",
                sources=(
                    Source(service="web"),
                    Source(identity="spiffe://default/ops/*"),
                    Source(service="*"),
                ),
            ),
        ),
        shadow=False,
    )


def test_parse_resource_shadow_defaults_to_false() -> None:
    doc = resource()
    del doc["spec"]["shadow"]
    assert parse_resource(doc, "p.yaml").shadow is False


RULE0 = "spec.rules[0]"
SRC0 = "spec.rules[0].sources[0]"


@pytest.mark.parametrize(
    ("edit", "path", "reason"),
    [
        (lambda d: d.update(kind="Timeout"), "kind", "expected kind TrafficPermission"),
        (lambda d: d.pop("kind"), "kind", "required field is missing"),
        (lambda d: d.update(status={}), "status", "unknown field"),
        (lambda d: d.pop("metadata"), "metadata", "required field is missing"),
        (lambda d: d.update(metadata=[]), "metadata", "expected a mapping, got a list"),
        (lambda d: d["metadata"].update(name="Web_To_Api"), "metadata.name", "invalid name"),
        (lambda d: d["metadata"].update(name="x" * 64), "metadata.name", "invalid name"),
        (lambda d: d["metadata"].update(name="-web"), "metadata.name", "invalid name"),
        (lambda d: d["metadata"].pop("mesh"), "metadata.mesh", "required field is missing"),
        (lambda d: d["metadata"].update(mesh="My Mesh"), "metadata.mesh", "invalid mesh"),
        (lambda d: d["metadata"].update(labels={}), "metadata.labels", "unknown field"),
        (lambda d: d["spec"].pop("destination"), "spec.destination", "required field"),
        (
            lambda d: d["spec"]["destination"].update(service="a/b"),
            "spec.destination.service",
            "invalid service name 'a/b'",
        ),
        (
            lambda d: d["spec"]["destination"].update(tags={}),
            "spec.destination.tags",
            "unknown field",
        ),
        (lambda d: d["spec"].pop("rules"), "spec.rules", "required field is missing"),
        (lambda d: d["spec"].update(rules=[]), "spec.rules", "at least one rule is required"),
        (lambda d: d["spec"].update(rules={}), "spec.rules", "expected a list"),
        (lambda d: d["spec"].update(shadow="yes"), "spec.shadow", "expected true or false"),
        (lambda d: d["spec"].update(mode="strict"), "spec.mode", "unknown field"),
        (
            lambda d: d["spec"]["rules"][0].update(action="reject"),
            f"{RULE0}.action",
            "must be one of allow, deny, got 'reject'",
        ),
        (lambda d: d["spec"]["rules"][0].pop("action"), f"{RULE0}.action", "required field"),
        (
            lambda d: d["spec"]["rules"][0].update(sources=[]),
            f"{RULE0}.sources",
            "at least one source is required",
        ),
        (lambda d: d["spec"]["rules"][0].update(ports=[80]), f"{RULE0}.ports", "unknown field"),
        (
            lambda d: d["spec"]["rules"][0]["sources"].append({}),
            "spec.rules[0].sources[3]",
            "give exactly one of service, identity",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][0].update(identity="spiffe://default/x"),
            SRC0,
            "give exactly one of service, identity",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][0].update(tag="v1"),
            f"{SRC0}.tag",
            "unknown field",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][0].update(service=7),
            f"{SRC0}.service",
            "expected a non-empty string, got int",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][1].update(identity="default/ops"),
            "spec.rules[0].sources[1].identity",
            "an identity must start with spiffe://",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][1].update(identity="spiffe://default/o*"),
            "spec.rules[0].sources[1].identity",
            "'*' is only allowed as a final '/*'",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][1].update(identity="spiffe://Default/x"),
            "spec.rules[0].sources[1].identity",
            "the trust domain may use only",
        ),
    ],
)
def test_parse_resource_rejects_invalid(edit: Any, path: str, reason: str) -> None:
    doc = resource()
    edit(doc)
    with pytest.raises(SnapshotError) as err:
        parse_resource(doc, "policies/web-to-api.yaml")
    assert (err.value.source, err.value.path) == ("policies/web-to-api.yaml", path)
    assert reason in err.value.reason
    assert str(err.value).startswith(f"policies/web-to-api.yaml: {path}: ")


def test_parse_resource_rejects_a_non_mapping_document() -> None:
    with pytest.raises(SnapshotError, match=r"^p\.yaml: expected a mapping, got a list$"):
        parse_resource([], "p.yaml")


# -- the fragment's validation (what the snapshot loader calls)

AUTHZ = "listeners[0].filter_chains[0].authz"


def authz_doc() -> dict[str, Any]:
    return {
        "default_action": "deny",
        "rules": [
            {
                "name": "web-to-api/0",
                "action": "allow",
                "identities": ["spiffe://default/web"],
                "prefixes": ["spiffe://default/ops/"],
                "shadow": False,
            }
        ],
    }


def test_authz_config_from_dict_applies_defaults() -> None:
    doc = {"rules": [{"name": "r", "action": "deny", "prefixes": ["spiffe://default/"]}]}
    assert AuthzConfig.from_dict(authz_node(doc)) == AuthzConfig(
        rules=(AuthzRule("r", "deny", (), ("spiffe://default/",), shadow=False),),
        default_action="deny",
    )
    assert AuthzConfig.from_dict(authz_node({})) == AuthzConfig(rules=())


def test_authz_config_round_trips_through_to_dict() -> None:
    config = AuthzConfig.from_dict(authz_node(authz_doc()))
    assert config.to_dict() == authz_doc()


@pytest.mark.parametrize(
    ("edit", "path", "reason"),
    [
        (lambda d: d.update(mode="x"), "mode", "unknown field"),
        (lambda d: d.update(default_action="drop"), "default_action", "must be one of"),
        (lambda d: d.update(rules={}), "rules", "expected a list"),
        (lambda d: d["rules"][0].pop("name"), "rules[0].name", "required field is missing"),
        (lambda d: d["rules"][0].update(name="a b"), "rules[0].name", "invalid rule name"),
        (lambda d: d["rules"][0].update(action=True), "rules[0].action", "must be one of"),
        (lambda d: d["rules"][0].update(shadow="no"), "rules[0].shadow", "expected true"),
        (lambda d: d["rules"][0].update(ports=[]), "rules[0].ports", "unknown field"),
        (
            lambda d: d["rules"][0].update(identities="spiffe://default/web"),
            "rules[0].identities",
            "expected a list, got a string",
        ),
        (
            lambda d: d["rules"][0]["identities"].append("spiffe://default/web/"),
            "rules[0].identities[1]",
            "empty segment",
        ),
        (
            lambda d: d["rules"][0]["prefixes"].append("spiffe://default/ops"),
            "rules[0].prefixes[1]",
            "a prefix is a SPIFFE ID followed by '/'",
        ),
        (
            lambda d: d["rules"][0]["prefixes"].append("spiffe://default//"),
            "rules[0].prefixes[1]",
            "invalid prefix",
        ),
        (
            lambda d: d["rules"][0].update(identities=[], prefixes=[]),
            "rules[0]",
            "at least one of identities, prefixes",
        ),
        (
            lambda d: d["rules"].append(copy.deepcopy(d["rules"][0])),
            "rules[1].name",
            "duplicate rule name 'web-to-api/0'",
        ),
    ],
)
def test_authz_config_from_dict_rejects_invalid(edit: Any, path: str, reason: str) -> None:
    doc = authz_doc()
    edit(doc)
    with pytest.raises(SnapshotError) as err:
        AuthzConfig.from_dict(authz_node(doc))
    assert (err.value.source, err.value.path) == ("snap.yaml", f"{AUTHZ}.{path}")
    assert reason in err.value.reason


# -- the decision

WEB = "spiffe://default/web"
OPS = "spiffe://default/ops/oncall"


def rule(
    name: str,
    action: Action,
    identities: tuple[str, ...] = (),
    prefixes: tuple[str, ...] = (),
    shadow: bool = False,
) -> AuthzRule:
    return AuthzRule(name, action, identities, prefixes, shadow)


def test_decide_allows_a_listed_identity() -> None:
    config = AuthzConfig((rule("p/0", "allow", (WEB,)),))
    assert decide(config, WEB) == Decision(True, "p/0")


def test_decide_denies_by_a_deny_rule() -> None:
    config = AuthzConfig((rule("p/0", "deny", (WEB,)),), default_action="allow")
    assert decide(config, WEB) == Decision(False, "p/0")


def test_decide_first_match_wins() -> None:
    config = AuthzConfig((rule("p/0", "deny", (WEB,)), rule("p/1", "allow", (WEB,))))
    assert decide(config, WEB) == Decision(False, "p/0")
    config = AuthzConfig((rule("p/0", "allow", (WEB,)), rule("p/1", "deny", (WEB,))))
    assert decide(config, WEB) == Decision(True, "p/0")


def test_decide_unmatched_falls_to_default_deny() -> None:
    config = AuthzConfig((rule("p/0", "allow", (WEB,)),))
    assert decide(config, "spiffe://default/batch") == Decision(False, "default")


def test_decide_unmatched_falls_to_default_allow() -> None:
    config = AuthzConfig((rule("p/0", "deny", (WEB,)),), default_action="allow")
    assert decide(config, "spiffe://default/batch") == Decision(True, "default")


def test_decide_prefix_matches_below_its_path_only() -> None:
    config = AuthzConfig((rule("p/0", "allow", prefixes=("spiffe://default/ops/",)),))
    assert decide(config, OPS).allowed
    assert decide(config, "spiffe://default/ops/team/a").allowed
    assert not decide(config, "spiffe://default/ops").allowed
    assert not decide(config, "spiffe://default/opsx").allowed


def test_decide_any_service_matches_the_mesh_only() -> None:
    config = to_snapshot([parse_resource(resource(), "p.yaml")], "api", MESH)
    assert decide(config, "spiffe://default/anything") == Decision(True, "web-to-api/0")
    assert decide(config, "spiffe://staging/web") == Decision(False, "default")


def test_decide_plaintext_falls_to_default() -> None:
    config = AuthzConfig((rule("p/0", "allow", prefixes=("spiffe://default/",)),))
    assert decide(config, None) == Decision(False, "default")
    allow = AuthzConfig(config.rules, default_action="allow")
    assert decide(allow, None) == Decision(True, "default")


def test_decide_empty_config_denies() -> None:
    assert decide(AuthzConfig(()), WEB) == Decision(False, "default")


def test_decide_shadow_deny_reports_and_continues() -> None:
    config = AuthzConfig(
        (
            rule("try/0", "deny", (WEB,), shadow=True),
            rule("all/0", "allow", prefixes=("spiffe://default/",)),
        )
    )
    assert decide(config, WEB) == Decision(True, "all/0", shadow_denied=True, shadow_rule="try/0")
    assert decide(config, OPS) == Decision(True, "all/0")


def test_decide_shadow_deny_never_reported_on_a_real_deny() -> None:
    config = AuthzConfig((rule("try/0", "deny", (WEB,), shadow=True),))
    assert decide(config, WEB) == Decision(False, "default")


def test_decide_shadow_deny_after_the_deciding_rule_is_not_reached() -> None:
    config = AuthzConfig((rule("p/0", "allow", (WEB,)), rule("try/0", "deny", (WEB,), shadow=True)))
    assert decide(config, WEB) == Decision(True, "p/0")


def test_decide_shadow_allow_met_first_shields_later_shadow_deny() -> None:
    config = to_snapshot(load_policies("shadow"), "api", MESH)
    # web: the shadow permission's allow matches first, so it would stay allowed
    assert decide(config, WEB) == Decision(True, "mesh-wide/0")
    # anyone else: the shadow permission would deny; the enforced one allows
    assert decide(config, OPS) == Decision(
        True, "mesh-wide/0", shadow_denied=True, shadow_rule="api-web-only/1"
    )


def test_decide_shadow_reports_against_default_allow() -> None:
    config = AuthzConfig((rule("try/0", "deny", (WEB,), shadow=True),), default_action="allow")
    assert decide(config, WEB) == Decision(True, "default", shadow_denied=True, shadow_rule="try/0")


# -- the registry


def test_registry_lists_traffic_permission_first() -> None:
    assert POLICIES[0].kind == "TrafficPermission"
    found = policy_type("TrafficPermission")
    assert found is not None
    assert found.parse_resource is parse_resource
    assert found.to_snapshot is to_snapshot
    assert policy_type("NoSuchPolicy") is None


def test_registry_imports_without_the_snapshot_loader() -> None:
    # The snapshot model will import the authz fragment; importing the policies must
    # therefore not import the snapshot loader, or the two would import each other.
    code = (
        "import sys, meshling.policies; "
        "assert 'meshling.snapshot.load' not in sys.modules, 'loader imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
