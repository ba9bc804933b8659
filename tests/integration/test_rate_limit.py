"""RateLimit on real inbounds: 429 with rate-limit fields, refills, TCP connections closed
over the limit, per-caller buckets by mTLS identity, and reloads that keep the buckets."""

from __future__ import annotations

import http.client
import socket
import time
from typing import Any

import pytest
import yaml

from meshling.policies.rate_limit import fragment, parse_resource

from .conftest import Nginx, free_port, http_snapshot, wait_for
from .test_mtls import Pki, inbound, metric, outbound
from .test_tcp_proxy import EchoServer, tcp_snapshot

pytestmark = pytest.mark.integration


def limited(nginx_port: int, rules: list[dict[str, Any]]) -> dict[str, Any]:
    doc = http_snapshot(free_port(), free_port(), [nginx_port])
    doc["listeners"][0]["filter_chains"][0]["rate_limit"] = {"rules": rules}
    return doc


def get(conn: http.client.HTTPConnection, path: str = "/hello") -> http.client.HTTPResponse:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response


def test_rate_limit_over_the_local_limit_is_429_with_rate_limit_fields(
    start_proxy, nginx: Nginx
) -> None:
    rule = {"name": "api", "identities": ["*"], "local": {"requests": 5, "interval": "10s"}}
    proxy = start_proxy(limited(nginx.port, [rule]))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    statuses = [get(conn).status for _ in range(5)]
    assert statuses == [200] * 5
    refused = get(conn)
    assert refused.status == 429
    assert refused.getheader("x-meshling-error") == "rate_limited"
    assert refused.getheader("ratelimit-limit") == "5"
    assert refused.getheader("ratelimit-remaining") == "0"
    # 5 per 10 s: the next token is about 2 s away
    assert refused.getheader("retry-after") in ("1", "2")
    assert refused.getheader("ratelimit-reset") == refused.getheader("retry-after")
    # the connection stays usable: a 429 is an answer, not an error
    assert get(conn).status == 429
    conn.close()
    text = proxy.metrics()
    assert metric(text, 'meshling_rate_limited_total{limit="local",listener="in",rule="api"}') == 2
    assert metric(text, "meshling_upstream_connections_total") == 1


def test_rate_limit_bucket_refills_at_the_rate(start_proxy, nginx: Nginx) -> None:
    rule = {
        "name": "api",
        "identities": ["*"],
        "local": {"requests": 10, "interval": "1s", "burst": 2},
    }
    proxy = start_proxy(limited(nginx.port, [rule]))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    assert [get(conn).status for _ in range(3)] == [200, 200, 429]
    time.sleep(0.25)  # two tokens at 10 a second
    assert [get(conn).status for _ in range(3)] == [200, 200, 429]
    conn.close()


def test_rate_limit_tcp_connections_over_the_limit_are_closed(start_proxy) -> None:
    echo = EchoServer()
    try:
        doc = tcp_snapshot(free_port(), free_port(), echo.port)
        doc["listeners"][0]["filter_chains"][0]["rate_limit"] = {
            "rules": [
                {"name": "db", "identities": ["*"], "tcp": {"connections": 3, "interval": "1m"}}
            ]
        }
        proxy = start_proxy(doc)
        kept = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            s.sendall(b"ping")
            assert s.recv(16) == b"ping"
            kept.append(s)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            # closed right after accept: nothing is forwarded, the client reads EOF
            assert s.recv(16) == b""
        for s in kept:
            s.close()
        text = proxy.metrics()
        assert (
            metric(text, 'meshling_rate_limited_total{limit="tcp",listener="tcp",rule="db"}') == 1
        )
    finally:
        echo.close()


RESOURCE = """
kind: RateLimit
metadata: {name: api-per-caller, mesh: default}
spec:
  sources: [{service: "*"}]
  destinations: [{service: api}]
  conf:
    local: {requests: 3, interval: 1m}
    per_source: true
"""


def test_rate_limit_per_source_buckets_by_mtls_identity(
    start_proxy, nginx: Nginx, pki: Pki
) -> None:
    # converted from a resource, as the control plane will
    resource = parse_resource(yaml.safe_load(RESOURCE), "rate-limit.yaml")
    doc = inbound(nginx.port, pki.issue("api"))
    doc["listeners"][0]["filter_chains"][0]["rate_limit"] = fragment([resource], "default")
    api = start_proxy(doc)
    web = start_proxy(outbound(api.port, pki.issue("web")))
    billing = start_proxy(outbound(api.port, pki.issue("billing")))
    web_conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=5)
    billing_conn = http.client.HTTPConnection("127.0.0.1", billing.port, timeout=5)
    assert [get(web_conn).status for _ in range(4)] == [200, 200, 200, 429]
    # web's bucket is empty; billing has a bucket of its own
    assert [get(billing_conn).status for _ in range(4)] == [200, 200, 200, 429]
    web_conn.close()
    billing_conn.close()


def test_rate_limit_named_caller_rule_beats_the_any_caller_rule(start_proxy, nginx: Nginx) -> None:
    # plaintext callers only match "*": the first rule holding the caller applies
    rules = [
        {
            "name": "web",
            "identities": ["spiffe://default/web"],
            "local": {"requests": 1, "interval": "1m"},
        },
        {"name": "rest", "identities": ["*"], "local": {"requests": 2, "interval": "1m"}},
    ]
    proxy = start_proxy(limited(nginx.port, rules))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    assert [get(conn).status for _ in range(3)] == [200, 200, 429]
    conn.close()


def test_rate_limit_reload_keeps_the_buckets_of_an_unchanged_rule(
    start_proxy, nginx: Nginx
) -> None:
    rule = {"name": "api", "identities": ["*"], "local": {"requests": 2, "interval": "1m"}}
    doc = limited(nginx.port, [rule])
    proxy = start_proxy(doc)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    assert [get(conn).status for _ in range(3)] == [200, 200, 429]
    conn.close()
    doc["version"] = "2"
    proxy.write_config(doc)
    wait_for(lambda: 'version="2"' in proxy.metrics(), 10, "reload")
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    assert get(conn).status == 429  # no fresh burst from a reload
    conn.close()
    # changed limits are a new bucket
    doc["version"] = "3"
    rule["local"] = {"requests": 3, "interval": "1m"}
    proxy.write_config(doc)
    wait_for(lambda: 'version="3"' in proxy.metrics(), 10, "reload")
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    assert get(conn).status == 200
    conn.close()


def test_rate_limit_bad_fragment_is_refused_naming_the_field(start_proxy, nginx: Nginx) -> None:
    from meshling.snapshot import SnapshotError, from_dict

    doc = limited(
        nginx.port,
        [{"name": "api", "identities": ["*"], "local": {"requests": 5, "interval": "-1s"}}],
    )
    with pytest.raises(SnapshotError) as err:
        from_dict(doc, "snap.yaml")
    assert err.value.path == "listeners[0].filter_chains[0].rate_limit.rules[0].local.interval"
