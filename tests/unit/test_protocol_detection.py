"""Protocol detection for ports declared `auto`: the classifier of first bytes, the
snapshot shape of an auto chain and its validation, and what the builder makes of an
`auto` port."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from meshling.controlplane.builder import build
from meshling.controlplane.resources import Dataplane, Inbound, Mesh, MeshTls, Outbound
from meshling.proxy.detect import H2_PREFACE, METHODS, PEEK_BYTES, classify
from meshling.snapshot import SnapshotError, from_dict
from meshling.snapshot.model import DETECT_TIMEOUT, TlsFiles

TLS_CLIENT_HELLO = bytes.fromhex("160301020001000200")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http1"),
        (b"POST /upload HTTP/1.0\r\n", "http1"),
        (b"OPTIONS * HTTP/1.1\r\n", "http1"),
        (b"PROPFIND /dav HTTP/1.1\r\n", "http1"),
        (H2_PREFACE + b"\x00\x00\x12\x04", "h2"),
        (TLS_CLIENT_HELLO, "tls"),
        (b"\x00\x01binary", "opaque"),
        (b"hello\n", "opaque"),
        (b"*1\r\n$4\r\nPING\r\n", "opaque"),  # a Redis client
        (b"get / HTTP/1.1\r\n", "opaque"),  # methods are case-sensitive
        (b"GETS / HTTP/1.1\r\n", "opaque"),  # not a known method
        (b"PRI * HTTP/1.1\r\n", "opaque"),  # not the HTTP/2 preface
        (b"\x16\x02\x00", "opaque"),  # no TLS record of major version 2
    ],
)
def test_classify_first_bytes(data: bytes, expected: str) -> None:
    assert classify(data) == expected


@pytest.mark.parametrize(
    "data",
    [b"", b"G", b"GE", b"GET", b"P", b"PU", b"PRI * HTTP/2.0\r\n", b"\x16", b"OPTIONS"],
)
def test_classify_needs_more_bytes_while_still_ambiguous(data: bytes) -> None:
    assert classify(data) is None


def test_classify_decides_every_prefix_of_a_request_line_once_complete() -> None:
    for method in METHODS:
        line = method + b" / HTTP/1.1\r\n"
        answers = [classify(line[:n]) for n in range(1, len(line) + 1)]
        # undecided up to the method and its space, HTTP/1 from there on
        assert answers == [None] * len(method) + ["http1"] * (len(line) - len(method))


def test_classify_decides_within_the_bytes_it_peeks_at() -> None:
    assert len(H2_PREFACE) <= PEEK_BYTES
    for data in (H2_PREFACE, b"UNLOCK / HTTP/1.1\r\n", TLS_CLIENT_HELLO, b"x" * 64):
        assert classify(data[:PEEK_BYTES]) is not None


def auto_snapshot(**chain: Any) -> dict[str, Any]:
    route = {"name": "r", "cluster": "c"}
    return {
        "version": "1",
        "listeners": [
            {
                "name": "auto",
                "port": 15001,
                "filter_chains": [
                    {
                        "protocol": "auto",
                        "http": {
                            "route_config": {
                                "virtual_hosts": [
                                    {"name": "all", "domains": ["*"], "routes": [route]}
                                ]
                            }
                        },
                        "tcp": {"cluster": "c"},
                        **chain,
                    }
                ],
            }
        ],
        "clusters": [{"name": "c", "endpoints": [{"address": "127.0.0.1", "port": 8080}]}],
    }


def test_snapshot_auto_chain_has_both_filters_and_the_default_timeout() -> None:
    chain = from_dict(auto_snapshot()).listeners[0].filter_chains[0]
    assert chain.protocol == "auto"
    assert chain.http is not None and chain.tcp is not None
    assert chain.detection is not None and chain.detection.timeout == DETECT_TIMEOUT


def test_snapshot_auto_chain_detect_timeout_parses_durations() -> None:
    chain = from_dict(auto_snapshot(detect_timeout="50ms")).listeners[0].filter_chains[0]
    assert chain.detection is not None and chain.detection.timeout == pytest.approx(0.05)


def test_snapshot_declared_protocol_matches_its_filter() -> None:
    document = auto_snapshot()
    chain = document["listeners"][0]["filter_chains"][0]
    chain["protocol"] = "tcp"
    del chain["http"]
    loaded = from_dict(document).listeners[0].filter_chains[0]
    assert loaded.protocol == "tcp" and loaded.detection is None


def _without(key: str) -> dict[str, Any]:
    document = auto_snapshot()
    del document["listeners"][0]["filter_chains"][0][key]
    return document


def _with(**chain: Any) -> dict[str, Any]:
    return auto_snapshot(**chain)


def _declared(protocol: str, drop: str, **chain: Any) -> dict[str, Any]:
    document = auto_snapshot(protocol=protocol, **chain)
    del document["listeners"][0]["filter_chains"][0][drop]
    return document


TLS = {"certificate": "c.pem", "key": "k.pem", "trust_bundle": "b.pem"}


@pytest.mark.parametrize(
    ("document", "path", "reason"),
    [
        (_without("tcp"), "listeners[0].filter_chains[0]", "tcp is missing"),
        (_without("http"), "listeners[0].filter_chains[0]", "http is missing"),
        (_with(protocol="udp"), "listeners[0].filter_chains[0].protocol", "must be one of"),
        (_with(detect_timeout="0s"), "listeners[0].filter_chains[0].detect_timeout", "more than 0"),
        (
            _with(detect_timeout="soon"),
            "listeners[0].filter_chains[0].detect_timeout",
            "invalid duration",
        ),
        (_with(tls=TLS), "listeners[0].filter_chains[0].tls", "not supported yet"),
        (_declared("http", "http"), "listeners[0].filter_chains[0].protocol", "http block"),
        (
            _declared("tcp", "http", detect_timeout="1s"),
            "listeners[0].filter_chains[0].detect_timeout",
            "only a chain with protocol: auto",
        ),
    ],
)
def test_snapshot_auto_chain_errors_name_the_field(
    document: dict[str, Any], path: str, reason: str
) -> None:
    with pytest.raises(SnapshotError) as caught:
        from_dict(copy.deepcopy(document))
    assert caught.value.path == path
    assert reason in caught.value.reason


def _dataplanes() -> tuple[Dataplane, Dataplane]:
    web = Dataplane(
        name="web-1",
        mesh="default",
        service="web",
        address="10.0.0.1",
        outbounds=(Outbound(port=15001, service="api", protocol="auto"),),
    )
    api = Dataplane(
        name="api-1",
        mesh="default",
        service="api",
        address="10.0.0.2",
        inbounds=(Inbound(port=15006, service_port=8080, protocol="auto"),),
    )
    return web, api


def test_builder_emits_the_auto_shape_for_auto_ports() -> None:
    web, api = _dataplanes()
    mesh = Mesh(name="default")
    for dataplane in (web, api):
        document = build(dataplane, mesh, [web, api], [], None)
        (chain,) = document["listeners"][0]["filter_chains"]
        assert chain["protocol"] == "auto"
        assert set(chain) >= {"http", "tcp"}
        loaded = from_dict({**document, "version": "1"})
        assert loaded.listeners[0].filter_chains[0].protocol == "auto"


def test_builder_makes_an_auto_inbound_opaque_under_mtls() -> None:
    web, api = _dataplanes()
    mesh = Mesh(name="default", mtls=MeshTls(enabled=True))
    files = TlsFiles(certificate="c.pem", key="k.pem", trust_bundle="b.pem")
    inbound = build(api, mesh, [web, api], [], files)["listeners"][0]["filter_chains"][0]
    assert "protocol" not in inbound and "http" not in inbound and "tcp" in inbound
    outbound = build(web, mesh, [web, api], [], files)["listeners"][0]["filter_chains"][0]
    assert outbound["protocol"] == "auto"
