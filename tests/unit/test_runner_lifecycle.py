"""`meshling run`'s decisions, played out on a fake clock: no process, no signal is real."""

from __future__ import annotations

import signal

import pytest

from meshling.runner.lifecycle import (
    EXIT_APP_NOT_FOUND,
    EXIT_PROXY_DIED,
    EXIT_PROXY_EXITED,
    EXIT_PROXY_NOT_READY,
    Action,
    AppExited,
    AppStartFailed,
    Exit,
    ExitStatus,
    Lifecycle,
    ProxyExited,
    ProxyNotReady,
    ProxyReady,
    Say,
    SignalApp,
    SignalProxy,
    SignalReceived,
    StartApp,
    State,
    Tick,
)

TERM, KILL, INT = signal.SIGTERM, signal.SIGKILL, signal.SIGINT


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0


def machine(clock: Clock) -> Lifecycle:
    return Lifecycle(
        clock.now, ready_timeout=5, drain_timeout=3, app_grace=2, admin="127.0.0.1:9901"
    )


def running(clock: Clock) -> Lifecycle:
    m = machine(clock)
    assert m.handle(ProxyReady(), clock.now) == [StartApp()]
    return m


def said(actions: list[Action]) -> str:
    return " | ".join(a.message for a in actions if isinstance(a, Say))


def without_say(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, Say)]


def test_exit_status_shell_code_and_words() -> None:
    assert ExitStatus(3).shell_code == 3
    assert ExitStatus(-signal.SIGTERM).shell_code == 143
    assert ExitStatus(-signal.SIGKILL).describe() == "was killed by SIGKILL"
    assert ExitStatus(1).describe() == "exited with code 1"


def test_runner_starts_the_app_only_once_the_proxy_is_ready() -> None:
    clock = Clock()
    m = machine(clock)
    clock.now += 4.9
    assert m.handle(Tick(), clock.now) == []
    assert m.handle(ProxyNotReady("503 starting"), clock.now) == []
    assert m.handle(ProxyReady(), clock.now) == [StartApp()]
    assert m.state is State.RUNNING
    assert m.deadline is None
    # a second ready answer starts nothing more
    assert m.handle(ProxyReady(), clock.now) == []


def test_runner_ready_timeout_stops_the_proxy_and_never_starts_the_app() -> None:
    clock = Clock()
    m = machine(clock)
    m.handle(ProxyNotReady("connection refused"), clock.now)
    m.handle(ProxyNotReady("503 starting"), clock.now)
    assert m.deadline == clock.now + 5
    clock.now += 5
    actions = m.handle(Tick(), clock.now)
    assert without_say(actions) == [SignalProxy(TERM)]
    assert "not ready within 5s" in said(actions)
    assert "GET http://127.0.0.1:9901/ready: 503 starting" in said(actions)
    assert "the app was not started" in said(actions)
    # a late ready answer does not start the app
    assert m.handle(ProxyReady(), clock.now) == []
    assert m.handle(ProxyExited(ExitStatus(0)), clock.now) == [Exit(EXIT_PROXY_NOT_READY)]


def test_runner_proxy_exiting_before_ready_exits_70_without_the_app() -> None:
    clock = Clock()
    m = machine(clock)
    actions = m.handle(ProxyExited(ExitStatus(1)), clock.now)
    assert actions[-1] == Exit(EXIT_PROXY_EXITED)
    assert "the proxy exited with code 1 before it was ready" in said(actions)
    assert not any(isinstance(a, StartApp) for a in actions)
    assert m.handle(ProxyReady(), clock.now) == []


def test_runner_proxy_not_stopping_after_timeout_is_killed() -> None:
    clock = Clock()
    m = machine(clock)
    clock.now += 5
    m.handle(Tick(), clock.now)
    clock.now += 2.9
    assert m.handle(Tick(), clock.now) == []
    clock.now += 0.1
    actions = m.handle(Tick(), clock.now)
    assert without_say(actions) == [SignalProxy(KILL)]
    assert m.deadline is None
    # the kill is what ended it: no second message
    assert m.handle(ProxyExited(ExitStatus(-KILL)), clock.now) == [Exit(EXIT_PROXY_NOT_READY)]


def test_runner_signal_before_ready_stops_the_start_up() -> None:
    clock = Clock()
    m = machine(clock)
    # not a stopping signal: nowhere to go yet
    assert m.handle(SignalReceived(signal.SIGUSR1), clock.now) == []
    actions = m.handle(SignalReceived(INT), clock.now)
    assert without_say(actions) == [SignalProxy(TERM)]
    assert "SIGINT before the proxy was ready" in said(actions)
    # a proxy that died of the SIGTERM it was sent is not reported as a failure
    assert m.handle(ProxyExited(ExitStatus(-TERM)), clock.now) == [Exit(128 + INT)]


def test_runner_forwards_every_signal_to_the_app_and_not_the_proxy() -> None:
    clock = Clock()
    m = running(clock)
    for signum in (INT, TERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        assert m.handle(SignalReceived(signum), clock.now) == [SignalApp(signum)]
    assert m.state is State.RUNNING
    # the app takes its time: the proxy keeps serving, no deadline runs
    assert m.deadline is None
    clock.now += 3600
    assert m.handle(Tick(), clock.now) == []


def test_runner_app_exit_drains_the_proxy_and_passes_the_code_on() -> None:
    clock = Clock()
    m = running(clock)
    actions = m.handle(AppExited(ExitStatus(3)), clock.now)
    # the app's leftovers in its process group, then the proxy's drain
    assert actions == [SignalApp(TERM), SignalProxy(TERM)]
    assert m.deadline == clock.now + 3
    assert m.handle(ProxyExited(ExitStatus(0)), clock.now) == [Exit(3)]
    assert m.state is State.DONE


def test_runner_app_killed_by_a_signal_exits_128_plus_n() -> None:
    clock = Clock()
    m = running(clock)
    m.handle(AppExited(ExitStatus(-TERM)), clock.now)
    assert m.handle(ProxyExited(ExitStatus(0)), clock.now) == [Exit(143)]


def test_runner_proxy_failing_its_drain_is_said_but_the_app_code_stands() -> None:
    clock = Clock()
    m = running(clock)
    m.handle(AppExited(ExitStatus(0)), clock.now)
    actions = m.handle(ProxyExited(ExitStatus(1)), clock.now)
    assert actions[-1] == Exit(0)
    assert "the proxy exited with code 1 on drain" in said(actions)


def test_runner_drain_past_the_timeout_kills_the_proxy() -> None:
    clock = Clock()
    m = running(clock)
    m.handle(AppExited(ExitStatus(0)), clock.now)
    clock.now += 3
    actions = m.handle(Tick(), clock.now)
    assert without_say(actions) == [SignalProxy(KILL)]
    assert "drain timeout (3s)" in said(actions)
    assert m.handle(Tick(), clock.now + 100) == []
    assert m.handle(ProxyExited(ExitStatus(-KILL)), clock.now) == [Exit(0)]


def test_runner_second_interrupt_while_draining_kills_the_proxy() -> None:
    clock = Clock()
    m = running(clock)
    m.handle(AppExited(ExitStatus(-INT)), clock.now)
    assert m.handle(SignalReceived(signal.SIGUSR1), clock.now) == []
    actions = m.handle(SignalReceived(INT), clock.now)
    assert without_say(actions) == [SignalProxy(KILL)]
    # once killed, more signals change nothing
    assert m.handle(SignalReceived(INT), clock.now) == []
    assert m.handle(ProxyExited(ExitStatus(-KILL)), clock.now) == [Exit(130)]


def test_runner_proxy_death_stops_the_app_then_kills_it_after_the_grace() -> None:
    clock = Clock()
    m = running(clock)
    actions = m.handle(ProxyExited(ExitStatus(-KILL)), clock.now)
    assert without_say(actions) == [SignalApp(TERM)]
    assert "the proxy was killed by SIGKILL while the app was running" in said(actions)
    assert m.state is State.STOPPING_APP
    # the user can still talk to the app
    assert m.handle(SignalReceived(signal.SIGUSR2), clock.now) == [SignalApp(signal.SIGUSR2)]
    clock.now += 1.9
    assert m.handle(Tick(), clock.now) == []
    clock.now += 0.1
    actions = m.handle(Tick(), clock.now)
    assert without_say(actions) == [SignalApp(KILL)]
    assert "did not stop within 2s" in said(actions)
    assert m.handle(Tick(), clock.now + 10) == []
    assert m.handle(AppExited(ExitStatus(-KILL)), clock.now) == [Exit(EXIT_PROXY_DIED)]


def test_runner_proxy_death_with_an_obliging_app_exits_72() -> None:
    clock = Clock()
    m = running(clock)
    m.handle(ProxyExited(ExitStatus(0)), clock.now)
    # the app's own code does not hide that the proxy went away
    assert m.handle(AppExited(ExitStatus(0)), clock.now) == [Exit(EXIT_PROXY_DIED)]


def test_runner_app_that_cannot_start_stops_the_proxy() -> None:
    clock = Clock()
    m = running(clock)
    actions = m.handle(AppStartFailed(EXIT_APP_NOT_FOUND, "cannot run nope"), clock.now)
    assert actions == [Say("cannot run nope"), SignalProxy(TERM)]
    assert m.handle(ProxyExited(ExitStatus(0)), clock.now) == [Exit(EXIT_APP_NOT_FOUND)]


@pytest.mark.parametrize("first", ["app", "proxy"])
def test_runner_both_children_exiting_together_exit_once(first: str) -> None:
    clock = Clock()
    m = running(clock)
    app, proxy = AppExited(ExitStatus(5)), ProxyExited(ExitStatus(-KILL))
    events = [app, proxy] if first == "app" else [proxy, app]
    exits = [a for e in events for a in m.handle(e, clock.now) if isinstance(a, Exit)]
    assert exits == ([Exit(5)] if first == "app" else [Exit(EXIT_PROXY_DIED)])
    assert m.handle(Tick(), clock.now) == []
    assert m.handle(SignalReceived(INT), clock.now) == []
