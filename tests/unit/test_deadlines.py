"""The timing wheel: deadlines fire no earlier than asked and at most one tick late."""

from __future__ import annotations

from meshling.proxy.deadlines import TimingWheel


class Entry:
    def __init__(self, name: str) -> None:
        self.name = name

    def on_timeout(self) -> None:  # pragma: no cover - the wheel never calls it
        raise AssertionError


def names(entries: list[object]) -> list[str]:
    return sorted(e.name for e in entries)  # type: ignore[attr-defined]


def test_deadlines_fire_in_their_tick_and_not_before() -> None:
    wheel = TimingWheel(tick=0.01)
    a, b, c = Entry("a"), Entry("b"), Entry("c")
    wheel.add(a, 1.000)
    wheel.add(b, 1.005)
    wheel.add(c, 1.050)
    assert wheel.expire(0.999) == []
    assert names(wheel.expire(1.0)) == ["a"]
    assert wheel.expire(1.004) == []
    assert names(wheel.expire(1.010)) == ["b"]  # at most one tick late
    assert len(wheel) == 1
    assert names(wheel.expire(5.0)) == ["c"]
    assert not wheel


def test_deadlines_removed_entries_never_fire() -> None:
    wheel = TimingWheel(tick=0.01)
    a, b = Entry("a"), Entry("b")
    slot_a = wheel.add(a, 2.0)
    wheel.add(b, 2.0)
    wheel.remove(a, slot_a)
    wheel.remove(a, slot_a)  # twice is harmless
    assert names(wheel.expire(3.0)) == ["b"]
    slot = wheel.add(a, 4.0)
    wheel.remove(a, slot)
    assert not wheel.slots


def test_deadlines_many_entries_expire_in_order_of_ticks() -> None:
    wheel = TimingWheel(tick=0.01)
    entries = [Entry(f"{i:03d}") for i in range(200)]
    for i, e in enumerate(entries):
        wheel.add(e, i * 0.005)
    fired: list[str] = []
    step = 0
    while wheel:
        step += 1
        now = step * 0.01
        batch = wheel.expire(now)
        for e in batch:
            deadline = int(e.name) * 0.005  # type: ignore[attr-defined]
            assert deadline <= now + 1e-9
            assert now - deadline <= 0.01 + 1e-9
        fired.extend(names(batch))
    assert fired == sorted(fired) and len(fired) == 200
