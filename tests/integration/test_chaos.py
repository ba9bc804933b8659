"""The test hosts (network namespaces) and the chaos suite's short form.

The first tests check the hosts themselves: addresses reachable across the switch, each
fault doing what it says and going away with `heal`, processes and namespaces removed at
the end even when the test fails. Then every chaos scenario (tests/integration/chaos.py)
runs briefly on one mesh and must meet its targets: >= 99.9 % of the requests
succeed in every scenario, none fails while the control plane is down or the proxies
restart one by one, failures after a host is cut off stop within the outlier-detection
window, and no proxy holds more FDs or memory after a scenario than before it.

About the short run's numbers: a scenario sends about 1000 requests, so 99.9 % allows one
failure, and a single unlucky request fails it. That is the target as stated,
not loosened; the long form (`make chaos`) sends about 5000 per scenario.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from .chaos import OUTLIER_WINDOW, SCENARIOS, SHORT, ChaosMesh, Result, Timing, render
from .hosts import Network, cleanup_leftovers, mesh_hosts, network  # noqa: F401

pytestmark = pytest.mark.integration


def _namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.split()}


def _curl(net: Network, src: str, url: str, timeout: float = 1.0) -> int:
    """curl's exit status for `url` from host `src` (0: answered, 7: refused, 28: timeout)."""
    argv = ["curl", "-s", "-o", "/dev/null", "-m", str(timeout), url]
    return net[src].run(argv, check=False, timeout=timeout + 5).returncode


def test_hosts_reach_each_other_and_nothing_is_left(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("test hosts need root")
    net = Network(["a", "b"], tmp_path)
    names = {net.switch, net["a"].netns, net["b"].netns}
    try:
        assert names <= _namespaces()
        assert net["a"].address != net["b"].address
        server = net["b"].start("http", ["python3", "-m", "http.server", "8000"])
        url = f"http://{net['b'].address}:8000/"
        deadline = time.monotonic() + 10
        while _curl(net, "a", url) != 0:
            assert time.monotonic() < deadline, server.tail()
            time.sleep(0.1)
        listing = net["a"].run(["curl", "-s", "-m", "2", url]).stdout
        assert "Directory listing" in listing
        # the hosts' addresses exist only in their namespaces, none in the root one
        root = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        assert net["a"].address not in root and net["b"].address not in root
        assert server.fds() > 2 and server.rss() > 1 << 20
    finally:
        net.close()
    assert not names & _namespaces()
    assert not server.alive


def test_hosts_faults_apply_and_heal(
    network: Callable[[Sequence[str]], Network],  # noqa: F811
) -> None:
    net = network(["a", "b"])
    a, b = net["a"], net["b"]
    b.start("http", ["python3", "-m", "http.server", "8000"])
    url = f"http://{b.address}:8000/"
    deadline = time.monotonic() + 10
    while _curl(net, "a", url) != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)

    net.cut(b)
    assert _curl(net, "a", url) == 28  # no answer at all: the cable is out
    net.heal(b)
    assert _curl(net, "a", url, timeout=3) == 0

    net.loss(b, 100)
    assert "statistic" in b.run(["iptables", "-S"]).stdout
    assert _curl(net, "a", url) == 28
    net.heal(b)
    assert "statistic" not in b.run(["iptables", "-S"]).stdout
    assert _curl(net, "a", url, timeout=3) == 0

    net.limit(a, "100kbit")
    assert "tbf" in a.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    net.heal()
    assert "tbf" not in a.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout


def test_hosts_cleanup_leftovers_removes_dead_runs_only(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("test hosts need root")
    # a process that is gone by now stands for a dead run
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"mshl-{dead.pid}-1-x"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    live = Network(["a"], tmp_path)
    try:
        removed = cleanup_leftovers()
        assert stale in removed
        assert stale not in _namespaces()
        assert live["a"].netns in _namespaces()
    finally:
        live.close()
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosMesh]:
    if os.geteuid() != 0:
        pytest.skip("the chaos suite needs root (network namespaces, iptables, tc)")
    cleanup_leftovers()
    net = Network(ChaosMesh.host_names(), tmp_path_factory.mktemp("chaos"))
    try:
        mesh = ChaosMesh(net)
        mesh.start()
        yield mesh
    finally:
        net.close()


_results: list[Result] = []


@pytest.mark.parametrize(("scenario", "fault"), SCENARIOS, ids=[name for name, _ in SCENARIOS])
def test_chaos_scenario_meets_target(
    chaos: ChaosMesh, scenario: str, fault: Callable[[ChaosMesh, Timing], None]
) -> None:
    result = chaos.run(scenario, SHORT, fault)
    _results.append(result)
    print("\n" + render([result], SHORT))
    assert result.sent >= SHORT.rps * (SHORT.lead + SHORT.tail) * 0.9
    if scenario == "host cut off" and result.failures_for is not None:
        assert result.failures_for <= OUTLIER_WINDOW
    assert result.passed, "\n".join(result.problems) + "\n" + render([result], SHORT)
