"""The most specific policy governs; selectors read with field paths."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshling.policies.matching import ANY, Selector, best_match, parse_selectors
from meshling.snapshot.load import SnapshotError, _Node


@dataclass(frozen=True)
class Policy:
    name: str
    sources: tuple[Selector, ...]
    destinations: tuple[Selector, ...]


EVERYONE = (Selector(),)
WEB = ("web", {"version": "v1", "zone": "a"})
API = ("api", {})


def test_a_selector_matches_service_and_every_tag() -> None:
    assert Selector().matches("web", {})
    assert Selector("web").matches("web")
    assert not Selector("web").matches("api")
    assert Selector(ANY, {"zone": "a"}).matches(*WEB)
    assert not Selector(ANY, {"zone": "b"}).matches(*WEB)
    assert not Selector("web", {"version": "v1", "canary": "yes"}).matches(*WEB)


def test_the_most_specific_policy_wins_destination_first() -> None:
    catch_all = Policy("a-catch-all", EVERYONE, EVERYONE)
    to_api = Policy("z-to-api", EVERYONE, (Selector("api"),))
    from_web = Policy("b-from-web", (Selector("web", {"zone": "a"}),), EVERYONE)
    assert best_match([catch_all], WEB, API) is catch_all
    # a named destination beats any source specificity
    assert best_match([catch_all, from_web, to_api], WEB, API) is to_api
    assert best_match([catch_all, from_web], WEB, API) is from_web
    from_web_exact = Policy("c-web", (Selector("web"),), (Selector("api"),))
    assert best_match([to_api, from_web_exact], WEB, API) is from_web_exact
    # other callers and destinations are not selected at all
    assert best_match([from_web_exact], ("batch", {}), API) is None
    assert best_match([from_web_exact], WEB, ("store", {})) is None


def test_ties_go_to_the_name_that_sorts_first_whatever_the_order() -> None:
    one, two = Policy("one", EVERYONE, EVERYONE), Policy("two", EVERYONE, EVERYONE)
    assert best_match([two, one], WEB, API) is one
    assert best_match([one, two], WEB, API) is one


@pytest.mark.parametrize(
    ("value", "path", "reason"),
    [
        ([], "spec.sources", "non-empty list"),
        ({"service": "web"}, "spec.sources", "non-empty list"),
        ([{"servce": "web"}], "spec.sources[0].servce", "unknown field"),
        (
            [{"service": "web", "tags": {"service": "x"}}],
            "spec.sources[0].tags.service",
            "not a tag",
        ),
        ([{"tags": {"zone": 3}}], "spec.sources[0].tags", ""),
    ],
)
def test_bad_selectors_name_the_field(value: object, path: str, reason: str) -> None:
    node = _Node("p.yaml", "spec", {"sources": value}).child("sources")
    with pytest.raises(SnapshotError) as caught:
        parse_selectors(node, "default")
    assert caught.value.path.startswith(path), caught.value
    assert reason in caught.value.reason


def test_selectors_parse() -> None:
    node = _Node(
        "p.yaml", "spec.sources", [{"service": "*"}, {"service": "web", "tags": {"v": "1"}}]
    )
    assert parse_selectors(node, "default") == (Selector(), Selector("web", {"v": "1"}))


def test_outbound_policies_act_in_callers_and_inbound_ones_in_the_called() -> None:
    from meshling.controlplane.resources import Dataplane, Inbound, Outbound
    from meshling.policies.matching import selects_inbound, selects_outbound

    @dataclass(frozen=True)
    class MeshPolicy(Policy):
        mesh: str = "default"

    web = Dataplane(
        name="web-1",
        mesh="default",
        service="web",
        address="10.0.0.1",
        tags={"zone": "a"},
        inbounds=(Inbound(15006, 8080),),
        outbounds=(Outbound(15001, "api"),),
    )
    api = Dataplane(
        name="api-1",
        mesh="default",
        service="api",
        address="10.0.0.2",
        inbounds=(Inbound(15006, 8080),),
    )
    web_to_api = MeshPolicy("p", (Selector("web"),), (Selector("api"),))
    assert selects_outbound(web_to_api, [web, api]).dataplanes == ("web-1",)
    assert selects_inbound(web_to_api, [web, api]).dataplanes == ("api-1",)
    to_store = MeshPolicy("p", EVERYONE, (Selector("store"),))
    selection = selects_outbound(to_store, [web, api])
    assert selection.empty
    assert "calling service store" in selection.unmatched("default")
