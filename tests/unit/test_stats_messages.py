"""The config stream's telemetry messages: `stats`, `tap_events`, `telemetry`, `tap`,
`untap`, their encoding, and what decoding refuses."""

from __future__ import annotations

import json

import pytest

from meshling.configstream.messages import (
    ProtocolError,
    Stats,
    StatsRow,
    Tap,
    TapEvents,
    TapFilter,
    TelemetryOffer,
    Untap,
    decode_client,
    decode_server,
    encode,
)
from meshling.telemetry.metrics import BUCKETS

ROW = StatsRow(
    "inbound",
    "web",
    "api",
    "default",
    (0, 90, 0, 0, 10),
    (0, 50, 40, 10, *[0] * (len(BUCKETS) - 3)),
    0.42,
    {"0": 3, "": 1},
)


@pytest.mark.parametrize(
    "message",
    [
        Stats(1700000000.5, BUCKETS, (ROW,)),
        Stats(1.0, (0.1,), ()),
        TapEvents("t1", ({"status": 200, "path": "/x"},), dropped=4),
    ],
)
def test_stats_client_messages_round_trip(message: Stats | TapEvents) -> None:
    assert decode_client(encode(message)) == message


@pytest.mark.parametrize(
    "message",
    [
        TelemetryOffer(5.0),
        Tap("t1", TapFilter("inbound", "api", "GET", "/users", "5xx"), 50.0, 100, 30.0),
        Tap("t2", TapFilter()),
        Untap("t1"),
    ],
)
def test_stats_server_messages_round_trip(message: TelemetryOffer | Tap | Untap) -> None:
    assert decode_server(encode(message)) == message


def stats_with(**row: object) -> str:
    body = json.loads(encode(Stats(1.0, (0.1, 1.0), ())))
    good = {
        "direction": "inbound",
        "source": "web",
        "destination": "api",
        "route": "r",
        "requests": [0, 1, 0, 0, 0],
        "buckets": [1, 0, 0],
        "sum": 0.01,
        "grpc": None,
    }
    body["rows"] = [good | row]
    return json.dumps(body)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (stats_with(), ""),
        (stats_with(direction="up"), r"stats.rows\[0\].direction: must be inbound or outbound"),
        (stats_with(requests=[1, 2]), r"stats.rows\[0\].requests: must be a list of 5 counts"),
        (stats_with(buckets=[1, 0]), r"stats.rows\[0\].buckets: must be a list of 3 counts"),
        (stats_with(requests=[0, -1, 0, 0, 0]), r"requests\[1\]: must be a non-negative"),
        (stats_with(sum="x"), r"stats.rows\[0\].sum: must be a non-negative number"),
        (stats_with(source=""), r"stats.rows\[0\].source: must be a non-empty string"),
        (stats_with(grpc={"0": 1.5}), r"grpc.0: must be a non-negative integer"),
        ('{"type":"stats","started":1,"bounds":[1,0.5],"rows":[]}', "stats.bounds: must be"),
        ('{"type":"stats","started":"x","bounds":[1],"rows":[]}', "stats.started: must be"),
        ('{"type":"stats","started":1,"bounds":[1],"rows":{}}', "stats.rows: must be a list"),
        ('{"type":"tap_events","id":"t","events":[1]}', "tap_events.events: must be a list"),
        ('{"type":"tap_events","events":[]}', "tap_events.id: must be a non-empty string"),
        ('{"type":"bye"}', r"hello, ack or nack \(and stats, tap_events\), not 'bye'"),
    ],
)
def test_stats_bad_client_messages_say_what_is_wrong(text: str, error: str) -> None:
    if not error:
        decode_client(text)
        return
    with pytest.raises(ProtocolError, match=error):
        decode_client(text)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"type":"telemetry","stats_interval":0}', "telemetry.stats_interval: must be a pos"),
        ('{"type":"tap","id":"t","filter":[]}', "tap.filter: must be a mapping"),
        ('{"type":"tap","id":"t","filter":{"status":"9xx"}}', "tap.filter.status: must be"),
        ('{"type":"tap","id":"t","filter":{"method":5}}', "tap.filter.method: must be a non"),
        ('{"type":"tap","id":"t","filter":{},"sample":150}', "tap.sample: a percent, at most"),
        ('{"type":"tap","id":"t","filter":{},"rate":0}', "tap.rate: must be a positive int"),
        ('{"type":"tap","id":"t","filter":{},"duration":-1}', "tap.duration: must be a pos"),
        ('{"type":"untap"}', "untap.id: must be a non-empty string"),
    ],
)
def test_stats_bad_server_messages_say_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_server(text)
