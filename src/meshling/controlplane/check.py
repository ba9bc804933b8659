"""`meshling check`: is the mesh healthy, as its control plane sees it?

The checks, as `linkerd check` does them, in groups: the control plane answers and takes
the admin token; every dataplane's proxy is connected and runs the snapshot last pushed
to it (a NACK names its reason); no proxy certificate expires within the warning window.
`evaluate` is a pure function of the dataplanes' status rows and a clock, so tests give
it rows; `report` formats the results, one line each, marked `ok` or `FAIL`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from meshling.controlplane.status import parse_iso


@dataclass(frozen=True, slots=True)
class Result:
    group: str
    ok: bool
    message: str


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> dt.timedelta:
    """`30m`, `24h`, `7d`: a warning window; ValueError when it is none of these."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match is None:
        raise ValueError(f"expected a duration such as 30m, 24h or 7d, got {text!r}")
    return dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def _span(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return f"{_span(-delta)} ago"
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    return f"{seconds // 60}m{seconds % 60}s"


def evaluate(
    statuses: Iterable[dict[str, Any]], now: dt.datetime, expiry_warning: dt.timedelta
) -> list[Result]:
    """The dataplane and certificate checks over the control plane's status rows."""
    rows = sorted(statuses, key=lambda r: (str(r.get("mesh")), str(r.get("name"))))
    results: list[Result] = []
    if not rows:
        return [Result("dataplanes", True, "no dataplanes registered")]

    def who(row: dict[str, Any]) -> str:
        return f"{row.get('mesh')}/{row.get('name')}"

    online = [r for r in rows if r.get("online")]
    for row in rows:
        if not row.get("online"):
            seen = row.get("last_seen") or "never"
            results.append(Result("dataplanes", False, f"{who(row)} is offline (last seen {seen})"))
    if len(online) == len(rows):
        results.append(Result("dataplanes", True, f"all {len(rows)} proxies are connected"))

    behind = 0
    for row in online:
        pushed, applied = row.get("pushed"), row.get("applied")
        if pushed and applied != pushed:
            behind += 1
            nack = row.get("last_nack")
            why = ""
            if isinstance(nack, dict) and nack.get("version") == pushed:
                why = f": refused it ({nack.get('reason')})"
            results.append(
                Result(
                    "dataplanes",
                    False,
                    f"{who(row)} runs {applied or 'nothing'}, not the snapshot pushed to it "
                    f"({pushed}){why}",
                )
            )
    if online and not behind:
        results.append(
            Result(
                "dataplanes", True, f"all {len(online)} online proxies run their latest snapshot"
            )
        )

    expiring = 0
    soonest: tuple[dt.timedelta, str] | None = None
    for row in rows:
        expires = parse_iso(row.get("certificate_expires"))
        if expires is None:
            continue
        left = expires - now
        if soonest is None or left < soonest[0]:
            soonest = (left, who(row))
        if left < expiry_warning:
            expiring += 1
            verb = "expired" if left.total_seconds() <= 0 else "expires in"
            results.append(
                Result(
                    "certificates",
                    False,
                    f"{who(row)}'s certificate {verb} {_span(left)} ({row['certificate_expires']})",
                )
            )
    if soonest is None:
        results.append(Result("certificates", True, "no proxy certificates (mTLS is off)"))
    elif not expiring:
        results.append(
            Result(
                "certificates",
                True,
                f"none expires within {_span(expiry_warning)} "
                f"(soonest: {soonest[1]} in {_span(soonest[0])})",
            )
        )
    return results


def report(results: Iterable[Result]) -> str:
    """One line per result under its group's heading, marked `ok` or `FAIL`."""
    lines: list[str] = []
    group = None
    for result in results:
        if result.group != group:
            group = result.group
            lines.append(group)
        lines.append(f"  {'ok  ' if result.ok else 'FAIL'} {result.message}")
    return "\n".join(lines) + "\n"
