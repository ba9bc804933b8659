"""Reconnect delays and failover across control-plane addresses, without I/O.

Delays grow exponentially with *full jitter* (a uniform draw between zero and the
exponential bound), so proxies that lost the same control plane at the same moment do not
come back at the same moment. A refusal (a revoked or wrong token) is not a network blip:
retrying soon would only be refused again, so it waits long.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Sequence
from typing import Final

BASE: Final = 0.5
CAP: Final = 30.0
# after a refusal: between half of this and all of it
REFUSED: Final = 300.0


class Backoff:
    """The delay before the next attempt, given how many failed in a row."""

    __slots__ = ("attempts", "base", "cap", "random", "refused")

    def __init__(
        self,
        base: float = BASE,
        cap: float = CAP,
        *,
        refused: float = REFUSED,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if not 0 < base <= cap:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.refused = refused
        self.random = random
        self.attempts = 0

    def bound(self) -> float:
        """The largest delay the next failure can draw."""
        # 2**attempts overflows float for large counts; the cap is reached long before
        return min(self.cap, self.base * float(2 ** min(self.attempts, 62)))

    def failure(self) -> float:
        """One more failure: the delay before trying again."""
        delay = self.random() * self.bound()
        self.attempts += 1
        return delay

    def refusal(self) -> float:
        """The control plane refused us: wait long, whatever the count."""
        self.attempts += 1
        return self.refused * (0.5 + 0.5 * self.random())

    def success(self) -> None:
        self.attempts = 0


class Addresses:
    """The control-plane addresses, tried in turn: a failure moves to the next one."""

    __slots__ = ("index", "urls")

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("at least one control-plane address is needed")
        self.urls = tuple(urls)
        self.index = 0

    @property
    def current(self) -> str:
        return self.urls[self.index]

    def failed(self) -> str:
        """The current address failed: the next one to try."""
        self.index = (self.index + 1) % len(self.urls)
        return self.current
