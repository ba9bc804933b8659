"""The proxy's side of transparent capture: original destinations, picking a chain by
them, the snapshot's transparent listeners, and what the builder makes of a transparent
dataplane."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

import pytest

from meshling.controlplane.builder import build
from meshling.controlplane.resources import Mesh, parse_resource
from meshling.snapshot import SnapshotError, from_dict
from meshling.snapshot.model import ChainMatch
from meshling.transparent.original_dst import parse_sockaddr
from meshling.transparent.table import ChainTable


def net(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def test_original_dst_parses_sockaddr_in() -> None:
    raw = struct.pack("=H", socket.AF_INET) + (8080).to_bytes(2, "big")
    raw += socket.inet_aton("240.1.2.3") + bytes(8)
    assert parse_sockaddr(raw) == ("240.1.2.3", 8080)


def test_original_dst_parses_sockaddr_in6() -> None:
    raw = struct.pack("=H", socket.AF_INET6) + (443).to_bytes(2, "big") + bytes(4)
    raw += socket.inet_pton(socket.AF_INET6, "fd00::7") + bytes(4)
    assert parse_sockaddr(raw) == ("fd00::7", 443)


@pytest.mark.parametrize("raw", [b"", b"\x02\x00\x00", struct.pack("=H", 99) + bytes(14)])
def test_original_dst_refuses_what_is_no_socket_address(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_sockaddr(raw)


def test_table_first_matching_chain_wins() -> None:
    table = ChainTable(
        [
            (ChainMatch(destinations=net("240.0.0.1/32")), "api"),
            (ChainMatch(destinations=net("240.0.0.2/32"), ports=frozenset({5432})), "db"),
            (ChainMatch(destinations=net("10.0.0.0/8")), "ten"),
            (ChainMatch(ports=frozenset({25})), "smtp"),
            (None, "passthrough"),
        ]
    )
    assert table.pick("240.0.0.1", 80) == "api"
    assert table.pick("240.0.0.1", 9999) == "api"
    assert table.pick("240.0.0.2", 5432) == "db"
    assert table.pick("240.0.0.2", 80) == "passthrough"
    assert table.pick("10.9.8.7", 80) == "ten"
    assert table.pick("192.0.2.1", 25) == "smtp"
    assert table.pick("192.0.2.1", 26) == "passthrough"


def test_table_order_beats_specificity_and_nothing_matches_is_none() -> None:
    table = ChainTable(
        [
            (ChainMatch(destinations=net("240.0.0.0/4")), "wide"),
            (ChainMatch(destinations=net("240.0.0.9/32")), "narrow"),
        ]
    )
    assert table.pick("240.0.0.9", 80) == "wide"
    assert table.pick("10.0.0.1", 80) is None
    assert table.pick("not-an-address", 80) is None


def test_table_handles_many_services() -> None:
    entries: list[tuple[ChainMatch | None, int]] = [
        (ChainMatch(destinations=net(f"240.0.{i // 256}.{i % 256}/32")), i) for i in range(3000)
    ]
    table = ChainTable(entries)
    assert table.pick("240.0.11.183", 80) == 11 * 256 + 183
    assert table.pick("240.0.200.1", 80) is None


def snapshot(listener: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "1",
        "listeners": [listener],
        "clusters": [{"name": "api", "endpoints": [{"address": "127.0.0.1", "port": 8080}]}],
    }


HTTP_CHAIN = {
    "http": {
        "route_config": {
            "virtual_hosts": [
                {"name": "api", "domains": ["*"], "routes": [{"name": "api", "cluster": "api"}]}
            ]
        }
    }
}


def test_load_transparent_listener() -> None:
    loaded = from_dict(
        snapshot(
            {
                "name": "outbound:transparent",
                "port": 15001,
                "transparent": True,
                "filter_chains": [
                    {"name": "api", "match": {"destinations": ["240.0.0.1"]}, **HTTP_CHAIN},
                    {"name": "db", "match": {"ports": [5432]}, "tcp": {"cluster": "api"}},
                    {"name": "passthrough", "passthrough": True},
                ],
            }
        )
    )
    listener = loaded.listeners[0]
    assert listener.transparent
    api, db, passthrough = listener.filter_chains
    assert api.match == ChainMatch(destinations=net("240.0.0.1/32"))
    assert db.match == ChainMatch(ports=frozenset({5432}))
    assert passthrough.passthrough and passthrough.match is None


@pytest.mark.parametrize(
    ("listener", "field", "reason"),
    [
        (
            {
                "transparent": True,
                "filter_chains": [
                    {"name": "p", "passthrough": True},
                    {"name": "q", "passthrough": True},
                ],
            },
            "listeners[0].filter_chains[1]",
            "unreachable: chain 'p'",
        ),
        (
            {
                "transparent": True,
                "filter_chains": [{"name": "a", **HTTP_CHAIN}, {"name": "a", "passthrough": True}],
            },
            "listeners[0].filter_chains[1].name",
            "duplicate name 'a'",
        ),
        (
            {"filter_chains": [{"name": "p", "passthrough": True}]},
            "listeners[0].filter_chains[0]",
            "need a listener with transparent: true",
        ),
        (
            {
                "transparent": True,
                "filter_chains": [{"name": "p", "passthrough": True, "tcp": {"cluster": "api"}}],
            },
            "listeners[0].filter_chains[0].tcp",
            "remove tcp",
        ),
        (
            {
                "transparent": True,
                "filter_chains": [
                    {"name": "a", "match": {"destinations": ["240.0.0.300"]}, **HTTP_CHAIN}
                ],
            },
            "listeners[0].filter_chains[0].match.destinations[0]",
            "invalid address or CIDR",
        ),
        (
            {"transparent": True, "filter_chains": []},
            "listeners[0].filter_chains",
            "needs a chain",
        ),
    ],
)
def test_load_transparent_mistakes_name_the_field(
    listener: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(SnapshotError) as caught:
        from_dict(snapshot({"name": "t", "port": 15001, **listener}), "t.yaml")
    assert f"t.yaml: {field}: " in str(caught.value)
    assert reason in str(caught.value)


RESOURCES = [
    {"kind": "Mesh", "metadata": {"name": "default"}, "spec": {"mtls": {"enabled": False}}},
    {
        "kind": "Dataplane",
        "metadata": {"name": "web", "mesh": "default"},
        "spec": {
            "service": "web",
            "address": "10.0.0.1",
            "inbounds": [{"port": 15010, "service_port": 8080, "protocol": "http"}],
            "transparent": {"outbound_port": 15001, "inbound_port": 15006},
        },
    },
    {
        "kind": "Dataplane",
        "metadata": {"name": "api-1", "mesh": "default"},
        "spec": {
            "service": "api",
            "address": "10.0.0.2",
            "inbounds": [{"port": 15010, "service_port": 8080, "protocol": "http"}],
        },
    },
    {
        "kind": "Dataplane",
        "metadata": {"name": "db-1", "mesh": "default"},
        "spec": {
            "service": "db",
            "address": "10.0.0.3",
            "inbounds": [{"port": 15010, "service_port": 5432}],
        },
    },
]


def test_builder_transparent_dataplane_gets_a_chain_per_service_by_virtual_ip() -> None:
    from meshling.dns.vip import allocate

    resources = [parse_resource(doc, "test") for doc in RESOURCES]
    mesh = resources[0]
    assert isinstance(mesh, Mesh)
    web, api, db = resources[1:]
    document = build(web, mesh, [web, api, db], [], None)  # type: ignore[arg-type]
    loaded = from_dict(document)  # the proxy takes it
    by_name = {li.name: li for li in loaded.listeners}
    outbound = by_name["outbound:transparent"]
    assert (outbound.address, outbound.port, outbound.transparent) == ("127.0.0.1", 15001, True)
    vips = allocate(["api", "db", "web"], "default")
    chains = {c.name: c for c in outbound.filter_chains}
    assert list(chains) == ["api", "db", "web", "passthrough"]
    assert chains["api"].match == ChainMatch(destinations=net(vips["api"] + "/32"))
    assert chains["api"].http is not None  # api's inbounds speak HTTP
    assert chains["db"].tcp is not None and chains["db"].tcp.cluster == "db"
    assert chains["passthrough"].passthrough
    assert [str(e) for e in loaded.clusters["api"].endpoints] == ["10.0.0.2:15010"]
    inbound = by_name["inbound:transparent"]
    assert (inbound.address, inbound.port) == ("0.0.0.0", 15006)
    (chain,) = inbound.filter_chains
    assert chain.match == ChainMatch(ports=frozenset({8080}))
    assert chain.http is not None


def test_builder_transparent_refuse_has_no_passthrough_and_ports_must_differ() -> None:
    docs = [dict(d) for d in RESOURCES]
    spec = dict(docs[1]["spec"])
    spec["transparent"] = {"unmatched": "refuse"}
    resources = [parse_resource(doc, "t") for doc in [docs[0], {**docs[1], "spec": spec}]]
    document = build(resources[1], resources[0], resources[1:], [], None)  # type: ignore[arg-type]
    (outbound,) = [li for li in document["listeners"] if li["name"] == "outbound:transparent"]
    assert [c["name"] for c in outbound["filter_chains"]] == ["web"]
    clash = {**spec, "transparent": {"inbound_port": 15010}}
    with pytest.raises(SnapshotError, match=r"spec.inbounds\[0\].port: port 15010 is already"):
        parse_resource({**docs[1], "spec": clash}, "t")
    bad = {**spec, "transparent": {"unmatched": "drop"}}
    with pytest.raises(SnapshotError, match=r"spec\.transparent\.unmatched: must be one of"):
        parse_resource({**docs[1], "spec": bad}, "t")


def test_affected_a_transparent_dataplane_by_every_change_of_its_mesh() -> None:
    from meshling.controlplane.builder import affected

    resources = [parse_resource(doc, "test") for doc in RESOURCES]
    dataplanes = resources[1:]
    # db changed: web has no outbound to it, but a chain and a cluster for it
    assert affected("Dataplane", "db-1", dataplanes, []) == {"db-1", "web"}  # type: ignore[arg-type]
    retry = parse_resource(
        {
            "kind": "Retry",
            "metadata": {"name": "to-db", "mesh": "default"},
            "spec": {
                "sources": [{"service": "*"}],
                "destinations": [{"service": "db"}],
                "conf": {"max_attempts": 2},
            },
        },
        "test",
    )
    assert "web" in affected("Retry", "to-db", dataplanes, [retry])  # type: ignore[arg-type]
