"""Snapshot loading: valid files build the model, invalid ones name file, field and reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from meshling.snapshot import SnapshotError, from_dict, load

EXAMPLE = Path(__file__).parents[2] / "examples" / "snapshot.yaml"


def base() -> dict[str, Any]:
    return {
        "version": "7",
        "listeners": [
            {
                "name": "in",
                "port": 15001,
                "filter_chains": [
                    {
                        "http": {
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "name": "r",
                                                "match": {"path": {"prefix": "/"}},
                                                "cluster": "c",
                                            }
                                        ],
                                    }
                                ]
                            }
                        }
                    }
                ],
            }
        ],
        "clusters": [{"name": "c", "endpoints": [{"address": "127.0.0.1", "port": 8080}]}],
    }


def test_snapshot_example_file_loads() -> None:
    snapshot = load(EXAMPLE)
    assert snapshot.version == "1"
    assert [li.name for li in snapshot.listeners] == ["http-in", "tcp-in"]
    assert snapshot.clusters["api"].connect_timeout == 1.0
    route = snapshot.listeners[0].filter_chains[0].http.route_config.virtual_hosts[0].routes[0]  # type: ignore[union-attr]
    assert route.match.methods == {b"GET", b"POST"}
    assert route.timeout == 5.0


def test_snapshot_defaults_are_applied() -> None:
    snapshot = from_dict(base())
    listener = snapshot.listeners[0]
    assert listener.address == "127.0.0.1"
    http = listener.filter_chains[0].http
    assert http is not None
    assert http.limits.max_request_line == 8192
    assert http.route_config.virtual_hosts[0].routes[0].timeout == 15.0
    assert snapshot.access_log is None


@pytest.mark.parametrize(
    ("mutate", "path", "reason"),
    [
        (lambda d: d["listeners"][0].update(port=70000), "listeners[0].port", "out of range"),
        (lambda d: d["listeners"][0].update(port="x"), "listeners[0].port", "expected an integer"),
        (
            lambda d: d["listeners"][0]["filter_chains"][0]["http"]["route_config"][
                "virtual_hosts"
            ][0]["routes"][0].update(cluster="nope"),
            "listeners[0].filter_chains[0].http.route_config.virtual_hosts[0].routes[0].cluster",
            "unknown cluster 'nope'",
        ),
        (
            lambda d: d["clusters"][0]["endpoints"][0].update(address="10.0.0.300"),
            "clusters[0].endpoints[0].address",
            "invalid IP address",
        ),
        (
            lambda d: d["clusters"][0].update(connect_timeout="5 parsecs"),
            "clusters[0].connect_timeout",
            "invalid duration",
        ),
        (lambda d: d["listeners"][0].update(colour="red"), "listeners[0].colour", "unknown field"),
        (lambda d: d.pop("listeners"), "listeners", "required field is missing"),
        (
            lambda d: d["listeners"][0]["filter_chains"][0]["http"]["route_config"][
                "virtual_hosts"
            ][0]["routes"][0]["match"].update(path={"regex": "(["}),
            "listeners[0].filter_chains[0].http.route_config.virtual_hosts[0].routes[0].match.path.regex",
            "invalid regular expression",
        ),
        (
            lambda d: d["listeners"][0]["filter_chains"][0]["http"]["route_config"][
                "virtual_hosts"
            ][0]["routes"][0]["match"].update(path={"prefix": "/a", "exact": "/b"}),
            "listeners[0].filter_chains[0].http.route_config.virtual_hosts[0].routes[0].match.path",
            "exactly one of exact, prefix, regex",
        ),
        (
            lambda d: d["clusters"].append(copy.deepcopy(d["clusters"][0])),
            "clusters[1].name",
            "duplicate name",
        ),
        (
            lambda d: d["listeners"].append(dict(copy.deepcopy(d["listeners"][0]), name="two")),
            "listeners[1].port",
            "already used by listener 'in'",
        ),
        (
            lambda d: d.update(access_log={"path": "-", "fields": ["nope"]}),
            "access_log.fields[0]",
            "unknown access log field",
        ),
    ],
)
def test_snapshot_invalid_field_is_named(mutate: Any, path: str, reason: str) -> None:
    document = base()
    mutate(document)
    with pytest.raises(SnapshotError) as info:
        from_dict(document, "mesh.yaml")
    assert info.value.source == "mesh.yaml"
    assert info.value.path == path
    assert reason in info.value.reason
    assert str(info.value).startswith(f"mesh.yaml: {path}: ")


def test_snapshot_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nlisteners: [\n  - name: x\n")
    with pytest.raises(SnapshotError) as info:
        load(bad)
    assert str(bad) in str(info.value)
    assert "line" in info.value.path
    assert "invalid YAML" in info.value.reason


def test_snapshot_json_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(base()))
    assert load(path).version == "7"
    path.write_text("{not json")
    with pytest.raises(SnapshotError, match="invalid JSON"):
        load(path)


def test_snapshot_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="cannot read file"):
        load(tmp_path / "absent.yaml")


def test_snapshot_durations_parse_units() -> None:
    document = base()
    document["clusters"][0]["connect_timeout"] = "250ms"
    document["clusters"][0]["idle_timeout"] = "2m"
    document["drain_timeout"] = 3
    snapshot = from_dict(document)
    assert snapshot.clusters["c"].connect_timeout == 0.25
    assert snapshot.clusters["c"].idle_timeout == 120.0
    assert snapshot.drain_timeout == 3.0
