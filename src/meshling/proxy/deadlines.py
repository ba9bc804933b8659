"""Request deadlines on a timing wheel: cheap to arm and disarm, one timer for all.

Arming a loop timer per request costs a heap insert and a handle on every
request, and nearly every one is cancelled again. The wheel rounds deadlines
up to a tick (10 ms by default), keeps the entries of each tick in a set, and
is advanced by one repeating timer that runs only while anything is armed. A
deadline fires no earlier than asked and at most one tick late.

The wheel itself is sans-I/O: `expire(now)` takes the time and returns what is
due, so it is tested with a fake clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from math import ceil
from typing import Protocol


class Expirable(Protocol):
    def on_timeout(self) -> None: ...


class TimingWheel:
    """Entries grouped by the tick their deadline falls in."""

    __slots__ = ("slots", "tick")

    def __init__(self, tick: float = 0.01) -> None:
        self.tick = tick
        self.slots: dict[int, set[Expirable]] = {}

    def add(self, entry: Expirable, deadline: float) -> int:
        """Arm `entry` for `deadline`; returns the slot to pass to `remove`."""
        slot = ceil(deadline / self.tick)
        bucket = self.slots.get(slot)
        if bucket is None:
            bucket = self.slots[slot] = set()
        bucket.add(entry)
        return slot

    def remove(self, entry: Expirable, slot: int) -> None:
        bucket = self.slots.get(slot)
        if bucket is not None:
            bucket.discard(entry)
            if not bucket:
                del self.slots[slot]

    def expire(self, now: float) -> list[Expirable]:
        """Remove and return every entry whose deadline is at or before `now`."""
        due: list[Expirable] = []
        if not self.slots:
            return due
        # The epsilon absorbs float error in now/tick, so an exact hit is not a tick late.
        current = now / self.tick + 1e-6
        for slot in sorted(s for s in self.slots if s <= current):
            due.extend(self.slots.pop(slot))
        return due

    def __len__(self) -> int:
        return sum(len(b) for b in self.slots.values())

    def __bool__(self) -> bool:
        return bool(self.slots)


class Deadlines:
    """A timing wheel driven by the event loop."""

    __slots__ = ("_slots", "_tick", "_timer", "clock", "loop", "wheel")

    def __init__(self, tick: float = 0.01, clock: Callable[[], float] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.clock = clock or self.loop.time
        self.wheel = TimingWheel(tick)
        # the wheel's own, for `add` and `remove`: they run for nearly every request
        self._slots = self.wheel.slots
        self._tick = tick
        self._timer: asyncio.TimerHandle | None = None

    def add(self, entry: Expirable, timeout: float) -> int:
        """Arm `entry` for `timeout` seconds from now; returns the slot to pass to `remove`.
        (`TimingWheel.add`, inlined.)"""
        slot = ceil((self.clock() + timeout) / self._tick)
        bucket = self._slots.get(slot)
        if bucket is None:
            bucket = self._slots[slot] = set()
        bucket.add(entry)
        if self._timer is None:
            self._timer = self.loop.call_later(self._tick, self._advance)
        return slot

    def remove(self, entry: Expirable, slot: int) -> None:
        """(`TimingWheel.remove`, inlined.)"""
        slots = self._slots
        bucket = slots.get(slot)
        if bucket is not None:
            bucket.discard(entry)
            if not bucket:
                del slots[slot]

    def _advance(self) -> None:
        self._timer = None
        for entry in self.wheel.expire(self.clock()):
            entry.on_timeout()
        if self.wheel:
            self._timer = self.loop.call_later(self.wheel.tick, self._advance)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
