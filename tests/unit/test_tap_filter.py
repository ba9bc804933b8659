"""Taps: the proxy's filter, sampling and rate limit on a fake clock, and the control
plane's relay of taps to the streams that can serve them."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from meshling.configstream.messages import ProtocolError, Tap, TapEvents, TapFilter
from meshling.controlplane.telemetry import TapHub, TapSubscription
from meshling.proxy.tap import MAX_RATE, Taps, TapSession, matches
from meshling.telemetry.metrics import Metrics


def test_tap_filter_matches_each_field() -> None:
    def ok(f: TapFilter, **kw: Any) -> bool:
        request = {
            "direction": "inbound",
            "destination": "api",
            "method": "GET",
            "path": "/users/7",
            "status": 200,
        } | kw
        return matches(f, **request)

    assert ok(TapFilter())
    assert ok(TapFilter(direction="inbound")) and not ok(TapFilter(direction="outbound"))
    assert ok(TapFilter(destination="api")) and not ok(TapFilter(destination="web"))
    assert ok(TapFilter(method="get")) and not ok(TapFilter(method="POST"))
    assert ok(TapFilter(path="/users")) and not ok(TapFilter(path="/orders"))
    assert ok(TapFilter(path="/")) and not ok(TapFilter(path="/users/7/x"))
    assert ok(TapFilter(status="2xx")) and not ok(TapFilter(status="5xx"))
    assert ok(TapFilter(status="503"), status=503) and not ok(TapFilter(status="503"), status=500)
    assert ok(TapFilter(status="5xx"), status=599)
    both = TapFilter(direction="inbound", method="GET", path="/users", status="2xx")
    assert ok(both) and not ok(both, method="PUT")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("direction", "sideways", "inbound or outbound"),
        ("status", "5x", "a class such as 5xx"),
        ("status", "600", "a class such as 5xx"),
        ("path", "users", "must start with /"),
    ],
)
def test_tap_filter_refuses_bad_fields(field: str, value: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=f"tap.filter.{field}: .*{reason}"):
        TapFilter(**{field: value})


def test_tap_session_rate_limits_on_a_token_bucket_and_counts_drops() -> None:
    session = TapSession(Tap("t", TapFilter(), rate=10), now=0.0)
    admitted = sum(session.admit(0.0) for _ in range(25))
    assert admitted == 10 and session.dropped == 15
    # events waiting count against the budget: drain them first
    session.events = []
    assert sum(session.admit(0.5) for _ in range(10)) == 5  # half a second: 5 tokens
    batch = session.take()
    assert batch is not None and batch.dropped == 20
    assert session.take() is None
    # the proxy caps whatever rate the control plane asks
    assert TapSession(Tap("t", TapFilter(), rate=10**9), now=0.0).rate == MAX_RATE


def exchange(method: bytes = b"GET", path: bytes = b"/x", status: int = 200) -> Any:
    head = SimpleNamespace(
        method=method, path=path, target=path + b"?q=1", host=b"api:80", headers=[]
    )
    return SimpleNamespace(
        head=head, status=status, endpoint=None, request_id=b"rid-1", is_grpc=False
    )


def test_taps_observe_installs_and_removes_the_hook() -> None:
    metrics = Metrics()
    metrics.service = "api"
    metrics.directions = {"in": "inbound", "out": "outbound"}
    clock = [0.0]
    taps = Taps(metrics, clock=lambda: clock[0], rand=lambda: 0.5)
    assert metrics.tap is None
    taps.add(Tap("a", TapFilter(direction="inbound", status="5xx"), duration=10))
    taps.add(Tap("b", TapFilter(path="/x"), sample=40.0))  # 0.5 * 100 >= 40: never taken
    assert metrics.tap is taps
    taps.observe(exchange(status=503), "in", "web", "default", "local", 0.0021)
    taps.observe(exchange(status=200), "in", "web", "default", "local", 0.001)
    taps.observe(exchange(status=503), "out", "", "default", "db~v=1", 0.001)
    taps.observe(exchange(status=503), "admin", "", "none", "none", 0.001)  # no direction
    batches = {b.id: b for b in taps.take()}
    assert set(batches) == {"a"}
    (event,) = batches["a"].events
    assert event["direction"] == "inbound" and event["source"] == "web"
    assert event["destination"] == "api" and event["status"] == 503
    assert event["method"] == "GET" and event["path"] == "/x?q=1"
    assert event["authority"] == "api:80" and event["request_id"] == "rid-1"
    assert event["duration_ms"] == 2.1 and event["route"] == "default"
    assert isinstance(event["time"], float)  # the control plane writes it in ISO 8601
    json.dumps(event)  # it goes on the wire as is
    # a tap ends by itself after its duration
    clock[0] = 11.0
    assert taps.take() == []
    assert set(taps.sessions) == {"b"}
    taps.remove("b")
    assert metrics.tap is None


def test_taps_outbound_events_name_the_called_service() -> None:
    metrics = Metrics()
    metrics.service = "web"
    metrics.directions = {"out": "outbound"}
    taps = Taps(metrics, clock=lambda: 0.0)
    taps.add(Tap("a", TapFilter(direction="outbound", destination="api")))
    taps.observe(exchange(), "out", "", "r", "api~version=v2", 0.001)
    taps.observe(exchange(), "out", "", "r", "db", 0.001)
    (batch,) = taps.take()
    assert [(e["source"], e["destination"]) for e in batch.events] == [("web", "api")]
    taps.clear()
    assert metrics.tap is None and taps.sessions == {}


def test_tap_hub_relays_taps_to_the_streams_concerned() -> None:
    hub = TapHub(stats_interval=5.0)
    frames: dict[str, list[dict[str, Any]]] = {"api-1": [], "web-1": [], "db-1": []}

    def sender(name: str) -> Any:
        return lambda frame: frames[name].append(json.loads(frame))

    sends = {name: sender(name) for name in frames}
    hub.connected(("default", "api-1"), "api", sends["api-1"], now=0.0)
    assert frames["api-1"] == [{"type": "telemetry", "stats_interval": 5.0}]
    got: list[tuple[Any, TapEvents]] = []
    tap = TapSubscription(
        "default",
        "api",
        TapFilter(direction="outbound", destination="api"),
        lambda key, batch: got.append((key, batch)),
        duration=30.0,
    )
    assert hub.subscribe(tap, now=0.0) == 0  # outbound: not api's own proxies
    hub.connected(("default", "web-1"), "web", sends["web-1"], now=10.0)
    hub.connected(("other", "db-1"), "web", sends["db-1"], now=10.0)  # another mesh
    assert frames["web-1"][1]["type"] == "tap" and frames["web-1"][1]["duration"] == 20.0
    assert [f["type"] for f in frames["db-1"]] == ["telemetry"]
    assert hub.events(("default", "web-1"), TapEvents(tap.id, ({"status": 200},)))
    assert got == [(("default", "web-1"), TapEvents(tap.id, ({"status": 200},)))]
    hub.unsubscribe(tap)
    assert frames["web-1"][-1] == {"type": "untap", "id": tap.id}
    assert not hub.events(("default", "web-1"), TapEvents(tap.id, ()))

    # a stream that went away is not offered new taps; both directions: every other
    # proxy of the mesh (a caller, perhaps) and the service's own. (A stream's `send` is
    # a bound method: another object each time, equal.)
    class Stream:
        def send(self, frame: str) -> None:
            frames["web-1"].append(json.loads(frame))

    stream = Stream()
    hub.connected(("default", "web-1"), "web", stream.send, now=20.0)
    hub.disconnected(("default", "web-1"), stream.send)
    both = TapSubscription("default", "web", TapFilter(destination="web"), lambda k, b: None)
    assert hub.subscribe(both, now=20.0) == 1
    assert set(both.sent) == {("default", "api-1")}


def test_taps_observe_http2_and_grpc_exchanges() -> None:
    from meshling.http2.headers import RequestHead2

    metrics = Metrics()
    metrics.service = "api"
    metrics.directions = {"in": "inbound"}
    taps = Taps(metrics, clock=lambda: 0.0)
    taps.add(Tap("g", TapFilter(path="/pkg.Svc/")))
    head = RequestHead2(
        b"POST",
        b"http",
        b"api:50051",
        b"/pkg.Svc/Call",
        b"",
        [(b"content-type", b"application/grpc"), (b"x-request-id", b"abc")],
        None,
    )
    ex = SimpleNamespace(
        head=head, status=200, endpoint=None, request_id=None, is_grpc=True, grpc_status=14
    )
    taps.observe(ex, "in", "web", "grpc", "local", 0.004)
    (batch,) = taps.take()
    (event,) = batch.events
    assert event["grpc_status"] == 14 and event["request_id"] == "abc"
    assert (event["method"], event["path"], event["authority"]) == (
        "POST",
        "/pkg.Svc/Call",
        "api:50051",
    )


def test_tap_hub_forgets_taps_whose_client_never_ended_them() -> None:
    hub = TapHub()
    sent: list[str] = []
    hub.connected(("default", "api-1"), "api", sent.append, now=0.0)
    abandoned = TapSubscription("default", "api", TapFilter(), lambda k, b: None, duration=5.0)
    hub.subscribe(abandoned, now=0.0)
    hub.subscribe(TapSubscription("default", "api", TapFilter(), lambda k, b: None), now=100.0)
    assert json.loads(sent[-2]) == {"type": "untap", "id": abandoned.id}
    assert not hub.events(("default", "api-1"), TapEvents(abandoned.id, ()))
