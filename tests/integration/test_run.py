"""`meshling run`: a real proxy, a real app (curl, sh, small Python programs), real signals.

Each test starts `meshling run` as a process of its own, looks at its exit code and
stderr, and checks by PID that neither the proxy nor the app is left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import Nginx, free_port, http_snapshot, wait_for

pytestmark = pytest.mark.integration

RUN = [sys.executable, "-m", "meshling", "--log-level", "warning", "run"]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for a parent that may never reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def read_pids(path: Path) -> tuple[int, int]:
    """The app's and the proxy's PIDs, once the app has written both."""

    def written() -> bool:
        return path.exists() and len(path.read_text().split()) == 2

    wait_for(written, 20, "the app to start")
    app_pid, proxy_pid = map(int, path.read_text().split())
    return app_pid, proxy_pid


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """`meshling run` processes of a test, killed (their whole session) if left running."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def run(
    started: list[subprocess.Popen[bytes]], options: list[str], app: list[str], **kw: Any
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [*RUN, *options, "--", *app], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw
    )
    started.append(proc)
    return proc


def finish(proc: subprocess.Popen[bytes], timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


def snapshot_file(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "snapshot.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def python_app(tmp_path: Path, name: str, source: str) -> list[str]:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return [sys.executable, str(path)]


def test_run_job_through_the_proxy_exits_0_and_leaves_no_proxy(
    tmp_path: Path, nginx: Nginx, started: list[subprocess.Popen[bytes]]
) -> None:
    port, admin = free_port(), free_port()
    config = snapshot_file(tmp_path, http_snapshot(port, admin, [nginx.port]))
    pid_file = tmp_path / "proxy.pid"
    # curl tries once, with no retry: it gets its answer only if the proxy listens already
    job = f'echo "$MESHLING_PROXY_PID" > {pid_file}; '
    job += f"exec curl -sS --fail http://127.0.0.1:{port}/hello"
    code, out, err = finish(run(started, ["--config", str(config)], ["sh", "-c", job]))
    assert code == 0, err
    # the app's stdout is the app's alone: the proxy's output goes to stderr
    assert out == "hello from nginx\n"
    proxy_pid = int(pid_file.read_text())
    assert not alive(proxy_pid)


def test_run_gives_the_app_the_mesh_addresses(
    tmp_path: Path, nginx: Nginx, started: list[subprocess.Popen[bytes]]
) -> None:
    port, admin = free_port(), free_port()
    config = snapshot_file(tmp_path, http_snapshot(port, admin, [nginx.port]))
    job = 'echo "$MESHLING_ADMIN $MESHLING_LISTENER_IN"; '
    job += 'curl -sS --fail "http://$MESHLING_LISTENER_IN/hello"'
    code, out, err = finish(run(started, ["--config", str(config)], ["sh", "-c", job]))
    assert code == 0, err
    assert out == f"127.0.0.1:{admin} 127.0.0.1:{port}\nhello from nginx\n"


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        (["sh", "-c", "exit 7"], 7),
        ([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], 137),
        (["no-such-command-for-meshling"], 127),
    ],
)
def test_run_exits_with_the_app_exit_code(
    tmp_path: Path, started: list[subprocess.Popen[bytes]], app: list[str], expected: int
) -> None:
    port, admin = free_port(), free_port()
    config = snapshot_file(tmp_path, http_snapshot(port, admin, [free_port()]))
    code, _, err = finish(run(started, ["--config", str(config)], app))
    assert code == expected, err
    if expected == 127:
        assert "cannot run no-such-command-for-meshling" in err


def test_run_forwards_sigterm_to_the_app_and_the_proxy_serves_its_shutdown(
    tmp_path: Path, nginx: Nginx, started: list[subprocess.Popen[bytes]]
) -> None:
    port, admin = free_port(), free_port()
    config = snapshot_file(tmp_path, http_snapshot(port, admin, [nginx.port]))
    marker = tmp_path / "marker"
    app = python_app(
        tmp_path,
        "app",
        f"""
        import os, signal, sys, time, urllib.request
        def stop(signum, frame):
            # the last piece of work goes through the mesh, during shutdown
            url = "http://" + os.environ["MESHLING_LISTENER_IN"] + "/hello"
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            open({str(marker)!r}, "w").write(signal.Signals(signum).name + " " + body)
            sys.exit(3)
        signal.signal(signal.SIGTERM, stop)
        open({str(tmp_path / "ready")!r}, "w").write("1")
        for _ in range(600):
            time.sleep(0.1)
        """,
    )
    proc = run(started, ["--config", str(config)], app)
    wait_for(lambda: (tmp_path / "ready").exists(), 20, "the app to start")
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 3, err
    assert marker.read_text() == "SIGTERM hello from nginx\n"


def test_run_ctrl_c_reaches_the_app_once_and_not_the_proxy(
    tmp_path: Path, nginx: Nginx, started: list[subprocess.Popen[bytes]]
) -> None:
    """A terminal's Ctrl-C goes to its whole foreground process group, `meshling run`'s."""
    port, admin = free_port(), free_port()
    config = snapshot_file(tmp_path, http_snapshot(port, admin, [nginx.port]))
    got = tmp_path / "signals"
    app = python_app(
        tmp_path,
        "app",
        f"""
        import os, signal, time, urllib.request
        seen = []
        signal.signal(signal.SIGINT, lambda signum, frame: seen.append("INT"))
        open({str(tmp_path / "ready")!r}, "w").write("1")
        for _ in range(600):
            if seen:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # a second SIGINT, if any, arrives meanwhile
        url = "http://" + os.environ["MESHLING_LISTENER_IN"] + "/hello"
        status = urllib.request.urlopen(url, timeout=5).status
        open({str(got)!r}, "w").write(",".join(seen) + f" {{status}}")
        """,
    )
    proc = run(started, ["--config", str(config)], app, start_new_session=True)
    wait_for(lambda: (tmp_path / "ready").exists(), 20, "the app to start")
    os.killpg(proc.pid, signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 0, err
    assert got.read_text() == "INT 200"


def test_run_stops_the_app_when_the_proxy_is_killed(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    port, admin = free_port(), free_port()
    config = snapshot_file(tmp_path, http_snapshot(port, admin, [free_port()]))
    app = python_app(
        tmp_path,
        "app",
        f"""
        import os, signal, sys, time
        def stop(signum, frame):
            open({str(tmp_path / "stopped")!r}, "w").write(signal.Signals(signum).name)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        open({str(tmp_path / "pids")!r}, "w").write(
            f"{{os.getpid()}} {{os.environ['MESHLING_PROXY_PID']}}"
        )
        for _ in range(600):
            time.sleep(0.1)
        """,
    )
    proc = run(started, ["--config", str(config)], app)
    app_pid, proxy_pid = read_pids(tmp_path / "pids")
    os.kill(proxy_pid, signal.SIGKILL)
    code, _, err = finish(proc)
    assert code == 72, err
    assert "the proxy was killed by SIGKILL while the app was running" in err
    assert (tmp_path / "stopped").read_text() == "SIGTERM"
    assert not alive(app_pid)


def test_run_kills_an_app_that_ignores_sigterm_after_the_grace(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    port, admin = free_port(), free_port()
    config = snapshot_file(tmp_path, http_snapshot(port, admin, [free_port()]))
    app = python_app(
        tmp_path,
        "app",
        f"""
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(tmp_path / "pids")!r}, "w").write(
            f"{{os.getpid()}} {{os.environ['MESHLING_PROXY_PID']}}"
        )
        for _ in range(600):
            time.sleep(0.1)
        """,
    )
    proc = run(started, ["--config", str(config), "--app-grace", "0.5"], app)
    app_pid, proxy_pid = read_pids(tmp_path / "pids")
    os.kill(proxy_pid, signal.SIGTERM)  # drains and exits 0: still, the app loses its mesh
    code, _, err = finish(proc)
    assert code == 72, err
    assert "the proxy exited with code 0 while the app was running" in err
    assert "the app did not stop within 0.5s of SIGTERM; killing it" in err
    assert not alive(app_pid)


def test_run_never_starts_the_app_when_the_proxy_exits_before_ready(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    port, admin = free_port(), free_port()
    config = snapshot_file(tmp_path, http_snapshot(port, admin, [free_port()]))
    marker = tmp_path / "app-ran"
    with socket.create_server(("127.0.0.1", port)):  # the listener's port is taken
        proc = run(started, ["--config", str(config)], ["touch", str(marker)])
        code, _, err = finish(proc)
    assert code == 70, err
    assert "the proxy exited with code 1 before it was ready; the app was not started" in err
    assert "cannot listen on 127.0.0.1" in err  # the proxy's own reason, on the same stderr
    assert not marker.exists()


def test_run_never_starts_the_app_without_a_control_plane_or_cache(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    admin = free_port()
    (tmp_path / "token").write_text("not-checked-by-anyone\n")
    dataplane = tmp_path / "web-1.yaml"
    dataplane.write_text(
        yaml.safe_dump(
            {
                "kind": "Dataplane",
                "metadata": {"name": "web-1", "mesh": "default"},
                "spec": {
                    "service": "web",
                    "address": "127.0.0.1",
                    "inbounds": [{"port": free_port(), "service_port": free_port()}],
                    "admin": {"port": admin},
                },
            }
        )
    )
    marker = tmp_path / "app-ran"
    options = [
        *("--cp", f"http://127.0.0.1:{free_port()}"),  # nothing listens there
        *("--token-file", str(tmp_path / "token")),
        *("--dataplane", str(dataplane)),
        *("--data-dir", str(tmp_path / "data")),
        *("--ready-timeout", "2"),
    ]
    proc = run(started, options, ["touch", str(marker)])
    code, _, err = finish(proc)
    assert code == 71, err
    assert f"the proxy was not ready within 2s (GET http://127.0.0.1:{admin}/ready" in err
    assert "the app was not started" in err
    assert not marker.exists()


def test_run_bad_config_starts_nothing(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    config = tmp_path / "snapshot.yaml"
    config.write_text("version: '1'\nadmin: {port: 99999}\nlisteners: []\nclusters: []\n")
    marker = tmp_path / "app-ran"
    code, _, err = finish(run(started, ["--config", str(config)], ["touch", str(marker)]))
    assert code == 2
    assert f"meshling run: {config}: admin.port" in err
    assert not marker.exists()


def test_run_killed_outright_leaves_no_orphans(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    port, admin = free_port(), free_port()
    config = snapshot_file(tmp_path, http_snapshot(port, admin, [free_port()]))
    pids = tmp_path / "pids"
    job = f'echo "$$ $MESHLING_PROXY_PID" > {pids}; while :; do sleep 0.1; done'
    proc = run(started, ["--config", str(config)], ["sh", "-c", job])
    app_pid, proxy_pid = read_pids(pids)
    proc.kill()
    proc.wait(10)
    wait_for(lambda: not alive(app_pid) and not alive(proxy_pid), 20, "the children to go")


def test_run_in_a_terminal_the_app_reads_it_and_gets_ctrl_c(tmp_path: Path) -> None:
    """Through a real pseudo-terminal: the app reads its input, Ctrl-C (^C) stops it."""
    import pty
    import select
    import time

    port, admin = free_port(), free_port()
    config = snapshot_file(tmp_path, http_snapshot(port, admin, [free_port()]))
    app = python_app(
        tmp_path,
        "app",
        """
        import signal, sys, time
        def interrupted(signum, frame):
            print("app got SIGINT", flush=True)
            sys.exit(5)
        signal.signal(signal.SIGINT, interrupted)
        print("hello", input("name? "), flush=True)
        time.sleep(60)
        """,
    )
    pid, terminal = pty.fork()
    if pid == 0:  # the child: `meshling run` on the terminal, as a shell would start it
        os.execv(sys.executable, [*RUN, "--config", str(config), "--", *app])
    seen = bytearray()

    def read_until(text: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in seen and time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.1)[0]:
                try:
                    seen.extend(os.read(terminal, 4096))
                except OSError:  # the terminal closed: everyone has exited
                    break
        assert text in seen, seen.decode(errors="replace")

    status = None
    try:
        read_until(b"name? ")
        os.write(terminal, b"mesh\n")
        read_until(b"hello mesh")
        os.write(terminal, b"\x03")  # Ctrl-C: SIGINT to the terminal's foreground group
        read_until(b"app got SIGINT")
        deadline = time.monotonic() + 20
        while status is None and time.monotonic() < deadline:
            done, code = os.waitpid(pid, os.WNOHANG)
            status = os.waitstatus_to_exitcode(code) if done else None
            time.sleep(0.05)
    finally:
        os.close(terminal)
        if status is None:  # failed or hung: stopped here (its children follow it)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert status == 5
    # Once: the terminal's SIGINT went to `meshling run`'s group, not to the app as well
    assert seen.count(b"app got SIGINT") == 1


def test_run_passes_stdin_and_sends_the_proxy_output_to_its_log(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    port, admin = free_port(), free_port()
    config = snapshot_file(tmp_path, http_snapshot(port, admin, [free_port()]))
    proxy_log = tmp_path / "proxy.log"
    command = [sys.executable, "-m", "meshling", "run", "--config", str(config)]
    proc = subprocess.Popen(
        [*command, "--proxy-log", str(proxy_log), "--", "tr", "a-z", "A-Z"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    started.append(proc)
    out, err = proc.communicate(b"through the app\n", timeout=30)
    assert proc.returncode == 0, err
    assert out == b"THROUGH THE APP\n"
    assert err == b""  # everything the proxy said is in its log
    log = proxy_log.read_text()
    assert "ready: snapshot 1" in log
    assert "stopped" in log


def test_run_stops_what_the_app_left_running(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    port, admin = free_port(), free_port()
    config = snapshot_file(tmp_path, http_snapshot(port, admin, [free_port()]))
    left = tmp_path / "left.pid"
    job = f"sleep 60 & echo $! > {left}"  # a background child, left behind by the app
    code, _, err = finish(run(started, ["--config", str(config)], ["sh", "-c", job]))
    assert code == 0, err
    wait_for(lambda: not alive(int(left.read_text())), 10, "the app's leftover to stop")
