"""HTTP/2 abuse, each case sent as raw frames: Rapid Reset, CONTINUATION floods, a header
list over the limit, SETTINGS and PING floods, and streams over the concurrency limit.
The offender gets GOAWAY and loses its connection, the proxy's memory stays bounded, and
other clients are served throughout."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from .conftest import Nginx, free_port, http_snapshot
from .test_mtls import metric

pytestmark = pytest.mark.integration

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 0xB
REFUSED_STREAM = 0x7


def request_block(encoder: Encoder, path: str = "/hello") -> bytes:
    return encoder.encode(
        [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "mesh")]
    )


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(PREFACE + SettingsFrame(0).serialize())
    return sock


def send_for(sock: socket.socket, data: bytes, seconds: float = 10.0) -> int:
    """Send as much of `data` as the peer takes within `seconds`; bytes sent."""
    sock.settimeout(0.5)
    sent, deadline = 0, time.monotonic() + seconds
    view = memoryview(data)
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(view[sent : sent + 65536])
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    return sent


def read_frames(sock: socket.socket, seconds: float = 10.0) -> tuple[list[Frame], bool]:
    """Frames received until the connection ends (True) or `seconds` pass (False)."""
    sock.settimeout(0.5)
    data = b""
    deadline = time.monotonic() + seconds
    closed = False
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            continue
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    frames: list[Frame] = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        if len(data) < 9 + length:
            break
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames, closed


def goaway(frames: list[Frame]) -> GoAwayFrame:
    found = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert found, f"no GOAWAY among {[type(f).__name__ for f in frames]}"
    return found[-1]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def still_serves(url: str) -> None:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url + "/hello",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.stdout == "200", out.stderr


@pytest.fixture
def proxy(start_proxy, nginx: Nginx):
    limits = {"max_resets": 100, "max_control_frames": 500, "max_concurrent_streams": 50}
    return start_proxy(
        http_snapshot(free_port(), free_port(), [nginx.port], http={"http2": limits})
    )


def test_rapid_reset_gets_goaway(proxy) -> None:
    sock = connect(proxy.port)
    encoder = Encoder()
    burst = bytearray()
    for i in range(1000):
        sid = 1 + 2 * i
        headers = HeadersFrame(
            sid, data=request_block(encoder), flags=["END_HEADERS", "END_STREAM"]
        )
        reset = RstStreamFrame(sid, error_code=0x8)  # CANCEL
        burst += headers.serialize() + reset.serialize()
    send_for(sock, bytes(burst))
    frames, closed = read_frames(sock)
    assert closed
    assert goaway(frames).error_code == ENHANCE_YOUR_CALM
    sock.close()
    text = proxy.metrics()
    assert (
        metric(text, 'meshling_http2_abuse_goaways_total{listener="in",reason="rapid_reset"}') == 1
    )
    # at most the budget's worth of streams reached the upstream
    assert (
        metric(
            text,
            'meshling_http_requests_total{cluster="up",listener="in",route="all",status_class="2xx"}',
        )
        <= 150 + 50
    )
    still_serves(proxy.url)


def test_continuation_flood_is_cut_off(proxy) -> None:
    before = rss_kb(proxy.proc.pid)
    sock = connect(proxy.port)
    encoder = Encoder()
    flood = bytearray(HeadersFrame(1, data=request_block(encoder), flags=[]).serialize())
    junk = b"\x00" * 16000
    for _ in range(2000):  # 32 MB of header block that never ends
        flood += ContinuationFrame(1, data=junk, flags=[]).serialize()
    sent = send_for(sock, bytes(flood))
    frames, closed = read_frames(sock)
    assert closed
    assert goaway(frames).error_code != 0
    assert sent < len(flood), "the whole flood was taken in"
    sock.close()
    assert rss_kb(proxy.proc.pid) - before < 20_000
    still_serves(proxy.url)


def test_header_list_over_the_limit_is_refused(proxy) -> None:
    sock = connect(proxy.port)
    encoder = Encoder()
    big = encoder.encode(
        [(":method", "GET"), (":path", "/hello"), (":scheme", "http"), (":authority", "m")]
        + [(f"x-big-{i}", "v" * 4000) for i in range(40)]  # 160 KB decoded
    )
    chunks = [big[i : i + 16000] for i in range(0, len(big), 16000)]
    frames_out = [HeadersFrame(1, data=chunks[0], flags=["END_STREAM"])]
    for i, chunk in enumerate(chunks[1:], 1):
        frames_out.append(
            ContinuationFrame(1, data=chunk, flags=["END_HEADERS"] if i == len(chunks) - 1 else [])
        )
    send_for(sock, b"".join(f.serialize() for f in frames_out))
    frames, closed = read_frames(sock)
    assert closed
    assert goaway(frames).error_code != 0
    still_serves(proxy.url)


@pytest.mark.parametrize("kind", ["settings", "ping"])
def test_control_frame_flood_gets_goaway(proxy, kind: str) -> None:
    before = rss_kb(proxy.proc.pid)
    sock = connect(proxy.port)
    if kind == "settings":
        frame = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535}).serialize()
    else:
        frame = PingFrame(0, opaque_data=b"12345678").serialize()
    send_for(sock, frame * 20_000)
    frames, closed = read_frames(sock)
    assert closed
    assert goaway(frames).error_code == ENHANCE_YOUR_CALM
    acks = [f for f in frames if isinstance(f, PingFrame | SettingsFrame) and "ACK" in f.flags]
    assert len(acks) <= 600
    sock.close()
    text = proxy.metrics()
    assert (
        metric(
            text, 'meshling_http2_abuse_goaways_total{listener="in",reason="control_frame_flood"}'
        )
        == 1
    )
    assert rss_kb(proxy.proc.pid) - before < 20_000
    still_serves(proxy.url)


def test_streams_over_the_announced_limit_are_refused_one_by_one(proxy) -> None:
    sock = connect(proxy.port)
    # the proxy announces its limit in its first SETTINGS frame
    frames, _ = read_frames(sock, 0.5)
    settings = [f for f in frames if isinstance(f, SettingsFrame) and "ACK" not in f.flags]
    assert settings[0].settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 50
    encoder = Encoder()
    opened = bytearray()
    for i in range(52):  # requests whose bodies never end keep their streams open
        block = request_block(encoder, "/swallow")
        opened += HeadersFrame(1 + 2 * i, data=block, flags=["END_HEADERS"]).serialize()
    send_for(sock, bytes(opened))
    frames, closed = read_frames(sock, 1.0)
    assert not closed
    refused = {f.stream_id: f.error_code for f in frames if isinstance(f, RstStreamFrame)}
    assert refused == {101: REFUSED_STREAM, 103: REFUSED_STREAM}
    assert not [f for f in frames if isinstance(f, GoAwayFrame)]
    # a client that keeps ignoring the limit runs out of its reset budget (a few streams
    # at a time: a burst of hundreds in one read meets the hard limit `h2` enforces, a
    # connection error, which ends the connection as surely)
    for first in range(52, 400, 8):
        burst = b"".join(
            HeadersFrame(
                1 + 2 * i, data=request_block(encoder, "/swallow"), flags=["END_HEADERS"]
            ).serialize()
            for i in range(first, first + 8)
        )
        try:
            sock.sendall(burst)
        except OSError:
            break
        time.sleep(0.01)
    frames, closed = read_frames(sock)
    assert closed
    assert goaway(frames).error_code == ENHANCE_YOUR_CALM
    still_serves(proxy.url)
