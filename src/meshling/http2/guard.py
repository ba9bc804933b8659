"""Budgets that keep an abusive HTTP/2 client from costing unbounded CPU or memory.

HTTP/2 lets a client make the server work with frames that cost the client almost
nothing. The `h2` library bounds some of it itself (at most 64 CONTINUATION frames per
header block, a header list size checked while decoding); what needs the server's own
accounting is counted here, per connection, in fixed windows of time:

- Rapid Reset (CVE-2023-44487): streams opened and reset by the client before they were
  answered. Each costs the server a routing decision and often an upstream request, so
  more than `max_resets` in a window ends the connection, when they are also more than
  half of the streams the client opened in it: a busy peer (another proxy whose own
  clients gave up on many requests at once) cancels many streams too, among many more
  that it lets finish. Streams refused for going over the concurrency limit count as
  resets: a client that keeps ignoring the limit is the same kind of offender.
- Control-frame floods (SETTINGS, PING, PRIORITY, WINDOW_UPDATE, empty DATA frames,
  CVE-2019-9512/9515/9516/9518): more than `max_control_frames` in a window ends it.

An offender gets GOAWAY with ENHANCE_YOUR_CALM and the connection closes once the
streams already under way have had a short grace period. Nothing here reads a clock:
`now` is an argument, so tests drive it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshling.snapshot.model import Http2Limits


class FloodGuard:
    """Counts one connection's cheap-to-send, costly-to-serve frames per window."""

    __slots__ = ("controls", "limits", "opened", "resets", "started", "tripped")

    def __init__(self, limits: Http2Limits, now: float) -> None:
        self.limits = limits
        self.started = now
        self.resets = 0
        self.opened = 0
        self.controls = 0
        # why the connection was ended, once it was
        self.tripped: str | None = None

    def _roll(self, now: float) -> None:
        if now - self.started >= self.limits.window:
            self.started = now
            self.resets = 0
            self.opened = 0
            self.controls = 0

    def opened_stream(self, now: float) -> None:
        """The client opened a stream."""
        self._roll(now)
        self.opened += 1

    def reset(self, now: float) -> bool:
        """A stream the client reset (or opened over the limit) before its answer;
        True when this one is over the budget."""
        self._roll(now)
        self.resets += 1
        if self.resets > self.limits.max_resets and self.resets * 2 > self.opened:
            self.tripped = "rapid_reset"
            return True
        return False

    def control(self, now: float, frames: int = 1) -> bool:
        """`frames` control frames received; True when over the budget."""
        self._roll(now)
        self.controls += frames
        if self.controls > self.limits.max_control_frames:
            self.tripped = "control_frame_flood"
            return True
        return False
