"""`meshling check`'s verdicts over status rows, with a fixed clock."""

from __future__ import annotations

import datetime as dt

import pytest

from meshling.controlplane.check import evaluate, parse_window, report

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(hours=24)


def row(name: str, **spec: object) -> dict[str, object]:
    base: dict[str, object] = {
        "mesh": "default",
        "name": name,
        "online": True,
        "last_seen": "2026-11-27T11:59:58Z",
        "pushed": "v2",
        "applied": "v2",
        "last_nack": None,
        "certificate_expires": "2026-11-28T20:00:00Z",
    }
    base.update(spec)
    return base


def test_a_healthy_mesh_passes_every_check() -> None:
    results = evaluate([row("web-1"), row("api-1")], NOW, DAY)
    assert all(r.ok for r in results)
    text = report(results)
    assert "ok   all 2 proxies are connected" in text
    assert "ok   none expires within 1d0h (soonest: default/api-1 in 1d8h)" in text


def test_failures_name_the_proxy_and_the_reason() -> None:
    results = evaluate(
        [
            row("web-1", online=False, last_seen="2026-11-27T11:00:00Z"),
            row("api-1", applied="v1", last_nack={"version": "v2", "reason": "port in use"}),
            row("api-2", certificate_expires="2026-11-27T15:30:00Z"),
            row("api-3", certificate_expires="2026-11-27T11:00:00Z"),
        ],
        NOW,
        DAY,
    )
    failed = [r.message for r in results if not r.ok]
    assert failed == [
        "default/web-1 is offline (last seen 2026-11-27T11:00:00Z)",
        "default/api-1 runs v1, not the snapshot pushed to it (v2): refused it (port in use)",
        "default/api-2's certificate expires in 3h30m (2026-11-27T15:30:00Z)",
        "default/api-3's certificate expired 1h0m ago (2026-11-27T11:00:00Z)",
    ]
    assert "FAIL default/web-1 is offline" in report(results)


def test_no_dataplanes_and_no_certificates() -> None:
    assert [r.message for r in evaluate([], NOW, DAY)] == ["no dataplanes registered"]
    results = evaluate([row("web-1", certificate_expires=None)], NOW, DAY)
    assert results[-1].message == "no proxy certificates (mTLS is off)"


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("24h", 86400), ("7d", 604800)])
def test_parse_window(text: str, seconds: int) -> None:
    assert parse_window(text).total_seconds() == seconds


def test_parse_window_refuses() -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_window("soon")
