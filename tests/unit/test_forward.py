"""The byte pipe shared by the TCP filter and passthrough, driven through fake transports:
held bytes, flow control, half-close and resets, with no socket."""

from __future__ import annotations

from typing import Any, cast

from meshling.proxy.forward import PENDING_LIMIT, ForwardDownstream, ForwardUpstream
from meshling.telemetry.metrics import ListenerStats


class FakeTransport:
    """Records what a protocol does to its transport."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.eof = False
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written += data

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class Chain:
    def __init__(self) -> None:
        self.listener_stats = ListenerStats()


def pipe() -> tuple[ForwardDownstream, FakeTransport, set[Any]]:
    connections: set[Any] = set()
    downstream = ForwardDownstream(cast(Any, Chain()), connections)
    transport = FakeTransport()
    downstream.connection_made(cast(Any, transport))
    connections.add(downstream)
    return downstream, transport, connections


def attach(downstream: ForwardDownstream) -> tuple[ForwardUpstream, FakeTransport]:
    upstream = ForwardUpstream(downstream)
    transport = FakeTransport()
    upstream.connection_made(cast(Any, transport))
    downstream.attach(upstream)
    return upstream, transport


def test_forward_bytes_before_the_upstream_are_held_then_sent_in_order() -> None:
    downstream, down, _ = pipe()
    downstream.data_received(b"a" * PENDING_LIMIT)
    assert down.reading
    downstream.data_received(b"b")
    assert not down.reading  # over the limit: stop reading until the upstream takes them
    downstream.eof_received()
    _, up = attach(downstream)
    assert bytes(up.written) == b"a" * PENDING_LIMIT + b"b"
    assert up.eof and down.reading
    assert downstream.chain.listener_stats.bytes_received == PENDING_LIMIT + 1


def test_forward_half_close_each_way_then_both_closed() -> None:
    downstream, down, _ = pipe()
    upstream, up = attach(downstream)
    assert downstream.eof_received() is True  # the other direction still flows
    assert up.eof and not down.closed
    upstream.data_received(b"answer")
    assert bytes(down.written) == b"answer"
    assert downstream.chain.listener_stats.bytes_sent == 6
    upstream.eof_received()
    assert down.closed  # both directions done


def test_forward_flow_control_pauses_the_other_side() -> None:
    downstream, down, _ = pipe()
    upstream, up = attach(downstream)
    downstream.pause_writing()
    assert not up.reading
    downstream.resume_writing()
    upstream.pause_writing()
    assert up.reading and not down.reading
    upstream.resume_writing()
    assert down.reading


def test_forward_upstream_reset_resets_the_downstream() -> None:
    downstream, down, _ = pipe()
    upstream, _ = attach(downstream)
    upstream.connection_lost(ConnectionResetError())
    assert down.aborted


def test_forward_upstream_clean_close_passes_the_fin_on() -> None:
    downstream, down, _ = pipe()
    upstream, _ = attach(downstream)
    upstream.connection_lost(None)
    assert down.eof and not down.aborted


def test_forward_downstream_gone_while_connecting_closes_the_late_upstream() -> None:
    downstream, _, connections = pipe()
    downstream.connection_lost(None)
    assert not connections and downstream.closed
    _, up = attach(downstream)
    assert up.closed and downstream.upstream is None


def test_forward_downstream_reset_closes_the_upstream_but_a_fin_is_passed_on() -> None:
    downstream, _, _ = pipe()
    _, up = attach(downstream)
    downstream.connection_lost(ConnectionResetError())
    assert up.closed and not up.eof
    downstream, _, _ = pipe()
    _, up = attach(downstream)
    downstream.eof_received()
    downstream.connection_lost(None)
    assert up.eof and not up.closed  # the upstream may still answer
