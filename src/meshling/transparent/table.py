"""Which chain of a transparent listener takes a connection, by its original destination.

A pure lookup, built once per snapshot: chains are tried in their snapshot order and the
first whose match holds the (address, port) wins; None means no chain takes it (the
listener refuses the connection). A mesh has one chain per service, each matching the
service's virtual IP, so single addresses are found by a dict instead of a scan and a
lookup costs the same for 3 services or 3000.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Generic, TypeVar

from meshling.snapshot.model import ChainMatch

T = TypeVar("T")


class ChainTable(Generic[T]):
    """(match, value) pairs in order; `pick` returns the value of the first that holds."""

    __slots__ = ("_entries", "_exact", "_wide")

    def __init__(self, entries: Sequence[tuple[ChainMatch | None, T]]) -> None:
        self._entries: list[tuple[ChainMatch, T]] = [
            (match or ChainMatch(), value) for match, value in entries
        ]
        # indexes of entries by each single address they name, and of the others
        self._exact: dict[str, list[int]] = {}
        self._wide: list[int] = []
        for i, (match, _) in enumerate(self._entries):
            hosts = [d for d in match.destinations if d.num_addresses == 1]
            for network in hosts:
                self._exact.setdefault(str(network.network_address), []).append(i)
            if not match.destinations or len(hosts) < len(match.destinations):
                self._wide.append(i)

    def values(self) -> list[T]:
        """Every entry's value, in order."""
        return [value for _, value in self._entries]

    def pick(self, address: str, port: int) -> T | None:
        """The value of the first entry matching the destination `address`:`port`."""
        exact: list[int] = self._exact.get(address, [])
        parsed: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        candidates: set[int] = {*exact, *self._wide}
        for i in sorted(candidates):
            match: ChainMatch = self._entries[i][0]
            value: T = self._entries[i][1]
            if match.ports and port not in match.ports:
                continue
            if not match.destinations or i in exact:
                return value
            if parsed is None:
                try:
                    parsed = ipaddress.ip_address(address)
                except ValueError:
                    return None
            if any(parsed in network for network in match.destinations):
                return value
        return None
