"""TrafficPermission: resource validation, conversion to the authz fragment (golden
files), the fragment's own validation, and the per-connection decision.

Golden files live in `src/meshling/policies/traffic_permission/testdata/`:
`<case>.policies.yaml` holds resources (several YAML documents), and
`<case>.<service>.authz.yaml` the `to_dict()` form of `to_snapshot(resources, service,
"default", instances)`, where `instances` (the dataplanes' tags by service, which tag
sources resolve against) is `<case>.instances.yaml` if there is one. Run with MESHLING_UPDATE_GOLDEN=1 to rewrite the outputs after a deliberate
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
    ("tags", "api"),
]


def load_policies(case: str) -> list[TrafficPermission]:
    path = TESTDATA / f"{case}.policies.yaml"
    with path.open(encoding="utf-8") as f:
        return [parse_resource(doc, str(path)) for doc in yaml.safe_load_all(f)]


def load_instances(case: str) -> dict[str, list[dict[str, str]]] | None:
    path = TESTDATA / f"{case}.instances.yaml"
    if not path.exists():
        return None
    instances: dict[str, list[dict[str, str]]] = yaml.safe_load(path.read_text())
    return instances


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
    config = to_snapshot(load_policies(case), service, MESH, load_instances(case))
    golden = TESTDATA / f"{case}.{service}.authz.yaml"
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        instances = f", {case}.instances.yaml" if load_instances(case) is not None else ""
        header = (
            f"# to_snapshot({case}.policies.yaml, destination_service={service!r}, "
            f"mesh={MESH!r}{instances})\n"
        )
        golden.write_text(header + yaml.safe_dump(config.to_dict(), sort_keys=False))
    expected = yaml.safe_load(golden.read_text(encoding="utf-8"))
    assert config.to_dict() == expected


@pytest.mark.parametrize(("case", "service"), GOLDEN, ids=[f"{c}.{s}" for c, s in GOLDEN])
def test_authz_config_from_dict_reads_golden(case: str, service: str) -> None:
    golden = yaml.safe_load((TESTDATA / f"{case}.{service}.authz.yaml").read_text())
    assert AuthzConfig.from_dict(authz_node(golden)) == to_snapshot(
        load_policies(case), service, MESH, load_instances(case)
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


def test_parse_resource_builds_tag_sources_sorted_by_key() -> None:
    doc = resource()
    doc["spec"]["rules"][0]["sources"] = [
        {"tags": {"zone": "a", "version": "v1"}},
        {"service": "web", "tags": {"version": "v1"}},
    ]
    assert parse_resource(doc, "p.yaml").rules[0].sources == (
        Source(tags=(("version", "v1"), ("zone", "a"))),
        Source(service="web", tags=(("version", "v1"),)),
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
            "give one of service, identity or tags",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][0].update(identity="spiffe://default/x"),
            SRC0,
            "give one of service, identity or tags",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][1].update(tags={"zone": "a"}),
            "spec.rules[0].sources[1]",
            "give one of service, identity or tags (tags may come with a service)",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][0].update(tags={}),
            f"{SRC0}.tags",
            "give at least one tag",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][0].update(tags=["zone=a"]),
            f"{SRC0}.tags",
            "expected a mapping, got a list",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][0].update(tags={"zone": 1}),
            f"{SRC0}.tags.zone",
            "expected a string, got int",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][0].update(tags={"zo ne": "a"}),
            f"{SRC0}.tags.zo ne",
            "invalid key 'zo ne'",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][0].update(tags={"service": "web"}),
            f"{SRC0}.tags.service",
            "the service is not a tag: write it beside the tags",
        ),
        (
            lambda d: d["spec"]["rules"][0]["sources"][2].update(tags={"zone": "a"}),
            "spec.rules[0].sources[2].service",
            'service "*" with tags selects no more than the tags alone',
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
            lambda d: d["rules"][0].update(tag_sources=[{"zone": "a"}]),
            "rules[0].tag_sources[0].zone",
            "unknown field",
        ),
        (
            lambda d: d["rules"][0].update(tag_sources=[{"service": "web"}]),
            "rules[0].tag_sources[0].tags",
            "required field is missing",
        ),
        (
            lambda d: d["rules"][0].update(tag_sources=[{"tags": {}}]),
            "rules[0].tag_sources[0].tags",
            "give at least one tag",
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


def test_authz_config_rule_resolved_to_nobody_round_trips() -> None:
    # tag sources that selected no service: no identities, and the sources kept
    doc = authz_doc()
    doc["rules"][0].update(identities=[], prefixes=[], tag_sources=[{"tags": {"zone": "c"}}])
    config = AuthzConfig.from_dict(authz_node(doc))
    assert config.rules[0].tag_sources == (Source(tags=(("zone", "c"),)),)
    assert config.to_dict() == doc
    assert decide(config, WEB) == Decision(False, "default")


def test_authz_rule_without_tag_sources_omits_the_field() -> None:
    assert "tag_sources" not in AuthzConfig.from_dict(authz_node(authz_doc())).to_dict()["rules"][0]


# -- tag sources, resolved against the dataplanes' tags


def tags_permission(action: Action, *sources: dict[str, Any], shadow: bool = False) -> Any:
    doc = resource()
    doc["spec"]["rules"] = [{"action": action, "sources": list(sources)}]
    doc["spec"]["shadow"] = shadow
    return parse_resource(doc, "p.yaml")


INSTANCES = {
    "web": [{"version": "v1", "zone": "a"}, {"version": "v2", "zone": "a"}],
    "batch": [{"version": "v1", "zone": "b"}],
    "idle": [],
}


def identities(config: AuthzConfig) -> list[tuple[str, ...]]:
    return [r.identities for r in config.rules]


def test_to_snapshot_tag_allow_needs_every_dataplane_of_the_service() -> None:
    # web has an instance of v2: allowing web's identity would let it in too
    allow_v1 = tags_permission("allow", {"tags": {"version": "v1"}})
    assert identities(to_snapshot([allow_v1], "api", MESH, INSTANCES)) == [
        ("spiffe://default/batch",)
    ]
    allow_a = tags_permission("allow", {"tags": {"zone": "a"}})
    assert identities(to_snapshot([allow_a], "api", MESH, INSTANCES)) == [("spiffe://default/web",)]


def test_to_snapshot_tag_deny_needs_any_dataplane_of_the_service() -> None:
    deny_v2 = tags_permission("deny", {"tags": {"version": "v2"}})
    assert identities(to_snapshot([deny_v2], "api", MESH, INSTANCES)) == [("spiffe://default/web",)]
    deny_v1 = tags_permission("deny", {"tags": {"version": "v1"}})
    # sorted by service name, whatever the order of the registry
    assert identities(to_snapshot([deny_v1], "api", MESH, INSTANCES)) == [
        ("spiffe://default/batch", "spiffe://default/web")
    ]


def test_to_snapshot_tag_source_with_service_selects_that_service_only() -> None:
    deny = tags_permission("deny", {"service": "batch", "tags": {"version": "v1"}})
    assert identities(to_snapshot([deny], "api", MESH, INSTANCES)) == [("spiffe://default/batch",)]
    unknown = tags_permission("deny", {"service": "nowhere", "tags": {"version": "v1"}})
    assert identities(to_snapshot([unknown], "api", MESH, INSTANCES)) == [()]


def test_to_snapshot_tag_source_every_tag_must_match() -> None:
    allow = tags_permission("allow", {"tags": {"version": "v1", "zone": "a"}})
    assert identities(to_snapshot([allow], "api", MESH, INSTANCES)) == [()]
    deny = tags_permission("deny", {"tags": {"version": "v2", "zone": "a"}})
    assert identities(to_snapshot([deny], "api", MESH, INSTANCES)) == [("spiffe://default/web",)]


def test_to_snapshot_service_without_dataplanes_is_never_selected() -> None:
    # "every dataplane" of none would be vacuously true: an allow must not select it
    for action in ("allow", "deny"):
        config = to_snapshot([tags_permission(action, {"tags": {"x": "y"}})], "api", MESH, {})
        assert identities(config) == [()]
        config = to_snapshot(
            [tags_permission(action, {"service": "idle", "tags": {"x": "y"}})],
            "api",
            MESH,
            INSTANCES,
        )
        assert identities(config) == [()]


def test_to_snapshot_shadow_tag_source_resolves_by_its_action() -> None:
    shadow_deny = tags_permission("deny", {"tags": {"version": "v2"}}, shadow=True)
    (rule,) = to_snapshot([shadow_deny], "api", MESH, INSTANCES).rules
    assert rule.shadow and rule.identities == ("spiffe://default/web",)


def test_to_snapshot_without_instances_tag_sources_match_nobody() -> None:
    # standalone: nothing to resolve tags from, so an allow grants nothing and a deny
    # denies nothing; the rule stays, with its tag sources, to be read
    allow = tags_permission("allow", {"tags": {"version": "v1"}}, {"service": "ops"})
    config = to_snapshot([allow], "api", MESH)
    (rule,) = config.rules
    assert rule.identities == ("spiffe://default/ops",)
    assert rule.tag_sources == (Source(tags=(("version", "v1"),)),)
    assert decide(config, "spiffe://default/web") == Decision(False, "default")
    deny = tags_permission("deny", {"tags": {"version": "v1"}})
    config = AuthzConfig(to_snapshot([deny], "api", MESH).rules, default_action="allow")
    assert config.rules[0].identities == ()
    assert decide(config, "spiffe://default/web") == Decision(True, "default")
    assert AuthzConfig.from_dict(authz_node(config.to_dict())) == config


def test_to_snapshot_tags_golden_decisions() -> None:
    config = to_snapshot(load_policies("tags"), "api", MESH, load_instances("tags"))
    assert decide(config, "spiffe://default/ops") == Decision(False, "api-by-tags/0")
    assert decide(config, "spiffe://default/web") == Decision(True, "api-by-tags/1")
    assert decide(config, "spiffe://default/batch") == Decision(True, "api-by-tags/1")
    assert decide(config, "spiffe://default/other") == Decision(False, "default")


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
