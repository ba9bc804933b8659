"""The web GUI in a real headless Chromium (Playwright), against `meshling demo` running in
the background: a control plane on SQLite, web -> api (two instances) -> store (nginx),
each behind its proxy with mTLS, and live traffic.

The demo prints the GUI's address with its admin token in the fragment; the tests open
it as a person would, follow links, and read what the pages say. A full-page screenshot
is kept under `$MESHLING_ARTIFACTS` (default `artifacts/` at the repository's root).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import uvicorn
from playwright.sync_api import Browser, expect, sync_playwright
from playwright.sync_api import Page as BrowserPage

from meshling.controlplane.api import create_app
from meshling.controlplane.store import open_store
from meshling.demo.main import find_nginx

from .conftest import free_port, wait_for

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("MESHLING_CHROMIUM", "/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
# how long live numbers may take to show: the stats window fills as proxies report
TRAFFIC_TIMEOUT = 25_000  # ms


def artifacts_dir() -> Path:
    directory = Path(os.environ.get("MESHLING_ARTIFACTS") or REPO / "artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@dataclass
class Demo:
    process: subprocess.Popen[str]
    output: Path
    gui_url: str

    @property
    def origin(self) -> str:
        parts = urlsplit(self.gui_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def token(self) -> str:
        return self.gui_url.split("#token=", 1)[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    if find_nginx(None) is None:
        pytest.skip("the demo's store service needs nginx (scripts/install-peers)")
    root = tmp_path_factory.mktemp("gui-demo")
    output = root / "stdout.txt"
    argv = [sys.executable, "-m", "meshling", "demo", "--workdir", str(root / "demo")]
    argv += ["--cp-port", "0", "--rps", "40", "--duration", "300", "--report-every", "60"]
    with output.open("w", encoding="utf-8") as stdout:
        process = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        text = ""
        while time.monotonic() < deadline and process.poll() is None:
            text = output.read_text(encoding="utf-8")
            if "sending traffic" in text:
                break
            time.sleep(0.2)
        assert "sending traffic" in text, f"the demo did not start:\n{text}"
        found = re.search(r"^web GUI: (http://\S+/gui/#token=\S+)$", text, re.MULTILINE)
        assert found, f"the demo did not print the GUI's address:\n{text}"
        yield Demo(process, output, found.group(1))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # the demo stops everything it started
            try:
                # 0: every process it started stopped on SIGTERM, none had to be killed
                assert process.wait(timeout=40) == 0, output.read_text(encoding="utf-8")
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (scripts/install-peers installs it)")
    with sync_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield browser
        browser.close()


@dataclass
class Page:
    """A page, and what it said on its console and in uncaught errors."""

    page: BrowserPage
    errors: list[str] = field(default_factory=list)

    def assert_no_errors(self) -> None:
        assert not self.errors, f"the page logged errors: {self.errors}"


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(10_000)
    watched = Page(context.new_page())
    watched.page.on(
        "console",
        lambda m: (
            watched.errors.append(f"{m.text} at {m.location.get('url')}")
            if m.type == "error"
            else None
        ),
    )
    watched.page.on("pageerror", lambda e: watched.errors.append(f"uncaught: {e}"))
    yield watched
    context.close()


def number(text: str) -> float:
    found = re.search(r"[\d.]+", text.replace(",", ""))
    return float(found.group()) if found else 0.0


def cell(page: BrowserPage, table: str, row: str, column: int) -> str:
    """The text of a cell of a row (by its first cell) of the table with that id."""
    return (
        page.locator(
            f"table#{table} tbody tr", has=page.locator("th", has_text=re.compile(f"^{row}$"))
        )
        .locator("th, td")
        .nth(column)
        .inner_text()
    )


def test_gui_overview_shows_the_mesh_its_services_and_live_traffic(demo: Demo, page: Page) -> None:
    p = page.page
    p.goto(demo.gui_url)
    expect(p.get_by_role("heading", name="Overview", level=1)).to_be_visible()
    # the token left the address bar (and the history) for the tab's storage
    assert "token" not in p.url
    assert p.evaluate("sessionStorage.getItem('meshling.adminToken')") == demo.token

    meshes = p.locator("table#meshes tbody tr")
    expect(meshes).to_have_count(1)
    expect(meshes.first).to_contain_text("default")
    expect(meshes.first).to_contain_text("strict")
    expect(p.locator("table#services tbody th")).to_have_text(["api", "store", "web"])
    expect(p.locator("table#services tbody tr").first).to_contain_text("2/2")

    # live: the page polls, and the numbers come from the stats the proxies report
    expect(p.locator(".notice")).to_have_count(0, timeout=TRAFFIC_TIMEOUT)
    # api and store are called through their proxies; web is called by the demo's client
    # directly, so only its outbound side (the edge web -> api) carries its traffic
    p.wait_for_function(
        """() => ['api', 'store'].every((name) => {
               const row = [...document.querySelectorAll('table#services tbody tr')]
                   .find((tr) => tr.cells[0].textContent === name);
               return row && parseFloat(row.cells[2].textContent) > 0;
           })""",
        timeout=TRAFFIC_TIMEOUT,
    )
    for service in ("api", "store"):
        assert number(cell(p, "services", service, 2)) > 0, service
        assert cell(p, "services", service, 3).endswith("%")
        assert cell(p, "services", service, 6).endswith("ms")
    assert number(cell(p, "services", "web", 2)) == 0
    assert number(cell(p, "meshes", "default", 6)) > 0
    # the page stays live: a later poll shows a new time
    stamp = p.locator("#updated").inner_text()
    expect(p.locator("#updated")).not_to_have_text(stamp, timeout=8_000)

    shot = artifacts_dir() / "gui-overview.png"
    p.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    page.assert_no_errors()


def test_gui_service_page_links_to_its_dataplanes_and_policies(demo: Demo, page: Page) -> None:
    p = page.page
    p.goto(demo.gui_url)
    p.locator("table#services").get_by_role("link", name="api", exact=True).click()
    expect(p.get_by_role("heading", name="Service api", level=1)).to_be_visible()
    assert p.url.endswith("#/services/api")
    expect(p).to_have_title("Service api · meshling")
    expect(p.locator("table#callers tbody")).to_contain_text("web → api")
    expect(p.locator("table#callees tbody")).to_contain_text("api → store")
    expect(p.locator("table#dataplanes tbody th")).to_have_text(["api-1", "api-2"])

    p.locator("table#dataplanes").get_by_role("link", name="api-1").click()
    expect(p.get_by_role("heading", name="Dataplane default/api-1", level=1)).to_be_visible()
    facts = p.locator("dl.facts")
    expect(facts).to_contain_text("online")
    expect(facts).to_contain_text("(ACK)")
    expect(facts).to_contain_text("version=v1")
    expect(p.locator("dt:text-is('Certificate expires') + dd")).to_have_text(re.compile("^in 23h"))
    expect(p.locator("table#outbounds tbody")).to_contain_text("store")
    expect(p.locator("ul.policies")).to_contain_text("TrafficPermission api-from-web")

    p.go_back()
    expect(p.get_by_role("heading", name="Service api", level=1)).to_be_visible()
    p.get_by_role("link", name="TrafficPermission api-from-web").click()
    expect(
        p.get_by_role("heading", name="TrafficPermission default/api-from-web", level=1)
    ).to_be_visible()
    expect(p.locator("ul#selected li")).to_have_text(["api-1", "api-2"])
    expect(p.locator("dl.facts")).to_contain_text("spec.destination.service")
    spec = p.locator("pre.spec").inner_text()
    assert "destination:\n  service: api" in spec, spec
    assert "- action: allow" in spec, spec
    p.locator("ul#selected").get_by_role("link", name="api-2").click()
    expect(p.get_by_role("heading", name="Dataplane default/api-2", level=1)).to_be_visible()
    page.assert_no_errors()


def test_gui_topology_draws_who_calls_whom_with_live_numbers(demo: Demo, page: Page) -> None:
    p = page.page
    p.goto(demo.gui_url)
    p.get_by_role("link", name="Topology", exact=True).click()
    expect(p.get_by_role("heading", name="Topology", level=1)).to_be_visible()
    edges = {}
    for source, destination in (("web", "api"), ("api", "store")):
        edge = p.locator(f'svg g.edge[data-source="{source}"][data-destination="{destination}"]')
        expect(edge).to_have_count(1)
        # live numbers on the edge once the proxies have reported
        expect(edge.locator("text")).to_contain_text("rps", timeout=TRAFFIC_TIMEOUT)
        edges[source] = edge
    assert number((edges["web"].locator("text").text_content() or "").split("·")[1]) > 0
    # layered left to right: callers first
    x = {
        s: p.locator(f'svg g.node[data-service="{s}"] rect').bounding_box()["x"]
        for s in ("web", "api", "store")
    }
    assert x["web"] < x["api"] < x["store"], x
    p.locator('svg g.node[data-service="store"] a').click()
    expect(p.get_by_role("heading", name="Service store", level=1)).to_be_visible()

    p.get_by_role("link", name="Topology", exact=True).click()
    expect(p.locator("svg g.edge")).to_have_count(2)
    shot = artifacts_dir() / "gui-topology.png"
    p.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    page.assert_no_errors()


def test_gui_wrong_token_asks_to_sign_in_and_the_form_signs_in(demo: Demo, page: Page) -> None:
    p = page.page
    p.goto(f"{demo.origin}/gui/#token=not-the-token")
    alert = p.get_by_role("alert")
    expect(alert).to_contain_text("The control plane refused the token")
    expect(alert).to_contain_text("wrong admin token")
    expect(p.get_by_role("heading", name="Sign in", level=1)).to_be_visible()
    # the API said 401, and only that is on the console
    assert page.errors and all("401" in e for e in page.errors), page.errors

    p.get_by_label("Admin token").fill(demo.token)
    p.get_by_role("button", name="Sign in").click()
    expect(p.get_by_role("heading", name="Overview", level=1)).to_be_visible()
    expect(p.locator("table#services tbody th")).to_have_text(["api", "store", "web"])

    p.get_by_role("button", name="Sign out").click()
    expect(p.get_by_role("heading", name="Sign in", level=1)).to_be_visible()
    assert p.evaluate("sessionStorage.getItem('meshling.adminToken')") is None


def test_gui_root_redirects_to_the_gui(demo: Demo, page: Page) -> None:
    p = page.page
    response = p.goto(f"{demo.origin}/")
    assert response is not None and response.ok
    assert p.url == f"{demo.origin}/gui/"
    # no token yet: the sign-in form, without an error
    expect(p.get_by_role("heading", name="Sign in", level=1)).to_be_visible()
    expect(p.get_by_role("alert")).to_have_count(0)
    page.assert_no_errors()


# -- a control plane without metrics -----------------------------------------------------


@dataclass
class BareControlPlane:
    """The API alone (no distributor: no stats, no stream status) in a thread, on a
    SQLite store holding a small mesh."""

    origin: str
    server: uvicorn.Server
    thread: threading.Thread


@pytest.fixture
def bare_control_plane(tmp_path: Path) -> Iterator[BareControlPlane]:
    port = free_port()
    holder: dict[str, uvicorn.Server] = {}

    async def serve() -> None:
        store = await open_store(str(tmp_path / "cp.db"))
        try:
            await store.create("Mesh", "default", "default", {})
            await store.create(
                "Mesh", "payments", "payments", {"mtls": {"enabled": True, "mode": "strict"}}
            )
            await store.create(
                "Dataplane",
                "payments",
                "billing-1",
                {
                    "service": "billing",
                    "address": "127.0.0.1",
                    "inbounds": [{"port": 15006, "service_port": 8080, "protocol": "http"}],
                },
            )
            for name, service, calls in (("web-1", "web", "api"), ("api-1", "api", None)):
                spec: dict[str, object] = {
                    "service": service,
                    "address": "127.0.0.1",
                    "tags": {"version": "v1"},
                    "inbounds": [{"port": 15006, "service_port": 8080, "protocol": "http"}],
                }
                if calls:
                    spec["outbounds"] = [{"port": 15001, "service": calls, "protocol": "http"}]
                await store.create("Dataplane", "default", name, spec)
            await store.create(
                "TrafficPermission",
                "default",
                "api-from-web",
                {
                    "destination": {"service": "api"},
                    "rules": [{"action": "allow", "sources": [{"service": "web"}]}],
                },
            )
            config = uvicorn.Config(
                create_app(store, BARE_TOKEN),
                host="127.0.0.1",
                port=port,
                lifespan="off",
                log_level="warning",
            )
            holder["server"] = server = uvicorn.Server(config)
            await server.serve()
        finally:
            await store.close()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    wait_for(lambda: "server" in holder and holder["server"].started, 10, "the API to serve")
    cp = BareControlPlane(f"http://127.0.0.1:{port}", holder["server"], thread)
    yield cp
    cp.server.should_exit = True
    thread.join(timeout=10)


BARE_TOKEN = "bare-admin-token"


def test_gui_without_metrics_says_so_and_shows_the_rest(
    bare_control_plane: BareControlPlane, page: Page
) -> None:
    p = page.page
    p.goto(f"{bare_control_plane.origin}/gui/#token={BARE_TOKEN}")
    expect(p.get_by_role("heading", name="Overview", level=1)).to_be_visible()
    expect(p.get_by_role("status").first).to_contain_text("No metrics yet")
    assert cell(p, "meshes", "default", 1) == "off"
    assert cell(p, "meshes", "payments", 1) == "strict"
    assert cell(p, "meshes", "payments", 3) == "0/1"
    expect(p.locator("table#services tbody th")).to_have_text(["api", "web"])
    assert cell(p, "services", "api", 2) == "\N{EN DASH}"

    # the mesh picker switches every mesh-wide page
    p.get_by_label("Mesh", exact=True).select_option("payments")
    expect(p.locator("table#services tbody th")).to_have_text(["billing"])
    p.get_by_label("Mesh", exact=True).select_option("default")
    expect(p.locator("table#services tbody th")).to_have_text(["api", "web"])

    # who calls whom, from the dataplanes' outbounds alone
    p.get_by_role("link", name="Topology", exact=True).click()
    edge = p.locator('svg g.edge[data-source="web"][data-destination="api"]')
    expect(edge.locator("text")).to_have_text("no traffic data")

    p.get_by_role("link", name="Dataplanes", exact=True).click()
    expect(p.locator("table#dataplanes tbody tr")).to_have_count(2)
    expect(p.locator("table#dataplanes tbody")).to_contain_text("offline")

    p.get_by_role("link", name="Policies", exact=True).click()
    expect(p.get_by_role("heading", name="TrafficPermission", level=2)).to_be_visible()
    p.get_by_role("link", name="api-from-web").click()
    expect(p.locator("ul#selected li")).to_have_text(["api-1"])
    # what failed is only what this control plane does not serve
    assert page.errors, "expected the refused stats and status calls on the console"
    assert all(("400" in e or "404" in e) for e in page.errors), page.errors
