"""The GUI's pure JavaScript (the topology layout, the YAML writer), run by Node.js: the
same ES modules the browser loads, imported as they are."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from meshling.controlplane.gui import STATIC_DIR

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js to run the GUI's modules")


def run_module(module: str, call: str, argument: Any) -> Any:
    """`call(argument)` with the named exports of `module` in scope; its JSON result."""
    assert NODE is not None
    url = (STATIC_DIR / module).as_uri()
    script = (
        f"const m = await import({json.dumps(url)});\n"
        f"const argument = {json.dumps(argument)};\n"
        f"process.stdout.write(JSON.stringify(({call})(m, argument)));\n"
    )
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def layout(nodes: list[str], edges: list[tuple[str, str]]) -> Any:
    return run_module(
        "topology.js",
        "(m, a) => m.layout(a.nodes, a.edges)",
        {"nodes": nodes, "edges": [{"source": s, "destination": d} for s, d in edges]},
    )


def test_gui_layout_puts_callers_left_of_the_services_they_call() -> None:
    placed = layout(
        ["store", "api", "web", "db"],
        [("web", "api"), ("api", "store"), ("api", "db"), ("web", "db")],
    )
    layers = {name: node["layer"] for name, node in placed["nodes"].items()}
    # db is called by web directly, but also by api: the longest chain decides
    assert layers == {"web": 0, "api": 1, "store": 2, "db": 2}
    assert placed["nodes"]["web"]["x"] < placed["nodes"]["api"]["x"] < placed["nodes"]["db"]["x"]
    assert not any(e["back"] for e in placed["edges"])
    # every node inside the drawing
    for node in placed["nodes"].values():
        assert 0 < node["x"] < placed["width"] and 0 < node["y"] < placed["height"]


def test_gui_layout_keeps_a_cycle_and_marks_the_edge_that_closes_it() -> None:
    placed = layout(["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "a"), ("b", "b")])
    layers = {name: node["layer"] for name, node in placed["nodes"].items()}
    assert layers == {"a": 0, "b": 1, "c": 2}
    back = {(e["source"], e["destination"]) for e in placed["edges"] if e["back"]}
    assert back == {("c", "a"), ("b", "b")}
    # the curve back to the left goes below the nodes, and the drawing makes room for it
    lowest = max(n["y"] for n in placed["nodes"].values()) + 40
    assert all(e["bottom"] > lowest for e in placed["edges"] if e["back"])
    assert placed["height"] > max(e["bottom"] for e in placed["edges"])


def test_gui_layout_orders_a_layer_to_keep_edges_from_crossing() -> None:
    # a1 -> b2 and a2 -> b1: by name the edges would cross; the sweeps uncross them
    placed = layout(["a1", "a2", "b1", "b2"], [("a1", "b2"), ("a2", "b1")])
    y = {name: node["y"] for name, node in placed["nodes"].items()}
    assert (y["a1"] < y["a2"]) == (y["b2"] < y["b1"])


def test_gui_layout_is_the_same_for_the_same_mesh() -> None:
    edges = [("web", "api"), ("api", "store"), ("batch", "store")]
    one = layout(["web", "api", "store", "batch"], edges)["nodes"]
    two = layout(["batch", "store", "api", "web"], list(reversed(edges)))["nodes"]
    assert one == two


@pytest.mark.parametrize(
    "document",
    [
        {
            "destination": {"service": "api"},
            "rules": [{"action": "allow", "sources": [{"service": "web", "tags": {"v": "2"}}]}],
        },
        {
            "conf": {"request": "5s", "retry_on": ["5xx", "reset"], "max": 3, "ratio": 0.5},
            "empty": {},
            "none": [],
            "odd": ["yes", "no", "null", "12", "a: b", " lead", "#x", "-", "", "ünï", "*"],
            "nested": [[1, 2], [{"k": None, "t": True}]],
        },
    ],
)
def test_gui_yaml_writer_round_trips_through_a_yaml_parser(document: dict[str, Any]) -> None:
    text = run_module("format.js", "(m, a) => m.yaml(a)", document)
    assert yaml.safe_load(text) == document, text


@pytest.mark.parametrize(
    ("rate", "shown", "health"),
    [
        (None, "\N{EN DASH}", "unknown"),
        (1.0, "100%", "good"),
        (0.99, "99.0%", "good"),
        (0.9899, "98.9%", "fair"),
        (0.57, "57.0%", "poor"),
        (0.99999, "99.9%", "good"),
        (0.95, "95.0%", "fair"),
        (0.5, "50.0%", "poor"),
        (0.0, "0%", "poor"),
    ],
)
def test_gui_success_rate_is_shown_and_coloured_by_its_thresholds(
    rate: float | None, shown: str, health: str
) -> None:
    assert run_module("format.js", "(m, a) => [m.percent(a), m.health(a)]", rate) == [
        shown,
        health,
    ]
