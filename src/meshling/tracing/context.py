"""Trace context on the wire: reading W3C Trace Context and B3 headers, and writing them.

A proxy hop reads the caller's context from the request, becomes a child of it, and
writes its own span as the parent of the next hop. The parsers here take header values
(bytes, as the HTTP codecs give them) and return a `Parent` or None; they never raise on
bad input, because a malformed trace header is the caller's problem, not a reason to
fail its request. An invalid header is never forwarded as it came: the proxy drops every
trace field of the request and writes fresh ones (`propagation_fields`).

Rules, from the specifications:

* `traceparent` (W3C Trace Context, level 1): `version-traceid-parentid-flags`, lower-case
  hex only; version `ff` is invalid; version `00` is exactly 55 characters; a later
  version may be longer (a `-` then more fields, ignored) and is read as `00` is; an
  all-zero trace id or parent id is invalid; two `traceparent` fields are invalid.
  `tracestate` is kept (as the caller sent it, if well-formed) only with a valid
  `traceparent`.
* `b3` (B3 single): `traceid-spanid[-sampling[-parentspanid]]`, or a lone sampling
  state; a 64-bit (16 hex) trace id is left-padded to 128 bits; sampling `1` accepts,
  `d` (debug) accepts, `0` denies; a lone `0` denies without naming a trace.
* `x-b3-*` (B3 multi): `x-b3-traceid` and `x-b3-spanid` together, `x-b3-sampled`
  (`1`/`0`, or `true`/`false` from old tracers), `x-b3-flags: 1` (debug: sampled).

Precedence: a valid `traceparent` wins over `b3`, which wins over `x-b3-*`.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

Format = Literal["w3c", "b3", "b3multi"]

# every request field that carries trace context: dropped from what is forwarded, and
# written again by the proxy
TRACE_FIELDS = frozenset(
    {
        b"traceparent",
        b"tracestate",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-b3-sampled",
        b"x-b3-flags",
    }
)
_HEX = frozenset(b"0123456789abcdef")
_HEX_DIGITS_AND_DASH = b"0123456789abcdef-"
_ODD_HEX = b"13579bdf"
# ids are kept as they travel: lower-case hex (32 and 16 digits), converted to numbers only
# for a span that is exported
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
# tracestate: at most 32 list members, and 512 bytes are what a vendor may rely on
_MAX_TRACESTATE_MEMBERS = 32
_MAX_TRACESTATE = 512


class Parent(NamedTuple):
    """The caller's trace context, as one format gave it (a tuple: made per request).

    Ids are lower-case hex. `span_id` is None for a B3 sampling state without ids
    (`b3: 1`): a decision, no
    trace. `sampled` is None when the caller left the decision to the proxy.
    """

    trace_id: bytes | None
    span_id: bytes | None
    sampled: bool | None
    format: Format
    tracestate: bytes = b""


def _hex(value: bytes, size: int) -> bytes | None:
    """`value` if it is exactly 2*size lower-case hex digits; None otherwise."""
    if len(value) != 2 * size or not _HEX.issuperset(value):
        return None
    return value


# version, trace id, parent id, flags; a later version may go on after a '-'
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def parse_traceparent(value: bytes) -> Parent | None:
    """A `traceparent` value, or None if invalid (module docstring)."""
    if len(value) == 55 and value[:3] == b"00-":
        # version 00, what every proxy of the mesh writes: checked without the regex
        # (only hex digits and the three dashes in their places)
        if (
            value[35] != 0x2D
            or value[52] != 0x2D
            or value.count(b"-") != 3
            or value.translate(None, _HEX_DIGITS_AND_DASH)
        ):
            return None
        trace_id = value[3:35]
        span_id = value[36:52]
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            return None
        # the sampled flag is the low bit of the flags: its second digit is odd
        return Parent(trace_id, span_id, value[54] in _ODD_HEX, "w3c")
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace, span, flags, rest = match.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    if trace == _ZERO_TRACE or span == _ZERO_SPAN:
        return None
    return Parent(trace, span, bool(int(flags, 16) & 1), "w3c")


def valid_tracestate(value: bytes) -> bool:
    """Is a (combined) `tracestate` value well-formed enough to pass on?

    The check is the list's shape (members `key=value` of printable ASCII, at most 32),
    not each vendor's key grammar: the proxy is not the owner of any member.
    """
    if len(value) > _MAX_TRACESTATE * 4:
        return False
    members = [m.strip(b" \t") for m in value.split(b",")]
    members = [m for m in members if m]
    if len(members) > _MAX_TRACESTATE_MEMBERS:
        return False
    for member in members:
        key, eq, val = member.partition(b"=")
        if not eq or not key or not val or len(key) > 256 or len(val) > 256:
            return False
        if any(c < 0x21 or c > 0x7E for c in key) or any(c < 0x20 or c > 0x7E for c in val):
            return False
    return True


def _trace_id_b3(value: bytes) -> bytes | None:
    if len(value) == 16:
        value = b"0" * 16 + value
    trace_id = _hex(value, 16)
    return None if trace_id is None or trace_id == _ZERO_TRACE else trace_id


def _span_id_b3(value: bytes) -> bytes | None:
    span_id = _hex(value, 8)
    return None if span_id is None or span_id == _ZERO_SPAN else span_id


_B3_SAMPLING = {b"1": True, b"d": True, b"0": False}


def parse_b3_single(value: bytes) -> Parent | None:
    """A `b3` value, or None if invalid (module docstring)."""
    value = value.strip(b" \t")
    if len(value) == 1:
        alone = _B3_SAMPLING.get(value)
        return None if alone is None else Parent(None, None, alone, "b3")
    parts = value.split(b"-")
    if not 2 <= len(parts) <= 4:
        return None
    trace_id = _trace_id_b3(parts[0])
    span_id = _span_id_b3(parts[1])
    if trace_id is None or span_id is None:
        return None
    sampled: bool | None = None
    if len(parts) >= 3:
        if parts[2] not in _B3_SAMPLING:
            return None
        sampled = _B3_SAMPLING[parts[2]]
    if len(parts) == 4 and _span_id_b3(parts[3]) is None:
        return None
    return Parent(trace_id, span_id, sampled, "b3")


_B3_SAMPLED = {b"1": True, b"true": True, b"0": False, b"false": False}


def parse_b3_multi(
    trace_id: bytes | None, span_id: bytes | None, sampled: bytes | None, flags: bytes | None
) -> Parent | None:
    """The `x-b3-*` values (None: absent), or None if they name no valid context."""
    decision: bool | None = None
    if sampled is not None:
        decision = _B3_SAMPLED.get(sampled.strip(b" \t").lower())
    if flags is not None and flags.strip(b" \t") == b"1":
        decision = True  # debug
    if trace_id is None and span_id is None:
        return None if decision is None else Parent(None, None, decision, "b3multi")
    if trace_id is None or span_id is None:
        return None
    tid = _trace_id_b3(trace_id.strip(b" \t"))
    sid = _span_id_b3(span_id.strip(b" \t"))
    if tid is None or sid is None:
        return None
    return Parent(tid, sid, decision, "b3multi")


class Incoming(NamedTuple):
    """What a request carried: the context that wins, and the formats it came in."""

    parent: Parent | None
    # B3 single / multi headers were present (valid or not): the reply in kind
    b3: bool = False
    b3multi: bool = False


NOTHING = Incoming(None)


def extract(headers: list[tuple[bytes, bytes]]) -> tuple[Incoming, list[tuple[bytes, bytes]]]:
    """The caller's context from request fields (lower-case names), and the fields
    without any trace field, in one pass."""
    # a comprehension, then a length check: about twice as fast as one loop that sorts
    # each field, and most requests carry one trace field or none
    kept = [field for field in headers if field[0] not in TRACE_FIELDS]
    if len(kept) == len(headers):
        return NOTHING, kept
    found = [field for field in headers if field[0] in TRACE_FIELDS]
    if len(found) == 1 and found[0][0] == b"traceparent":
        # the mesh's own format alone, as every hop after the first sends it
        return Incoming(parse_traceparent(found[0][1].strip(b" \t"))), kept
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in found:
        grouped.setdefault(name, []).append(value)
    return decide_parent(grouped), kept


def decide_parent(found: dict[bytes, list[bytes]]) -> Incoming:
    """Which of the trace fields present (by name, every value) gives the context."""
    parent: Parent | None = None
    traceparent = found.get(b"traceparent")
    if traceparent is not None and len(traceparent) == 1:
        parent = parse_traceparent(traceparent[0].strip(b" \t"))
        if parent is not None:
            state = b",".join(v.strip(b" \t") for v in found.get(b"tracestate", ()))
            if state and valid_tracestate(state):
                parent = Parent(parent.trace_id, parent.span_id, parent.sampled, "w3c", state)
    b3 = found.get(b"b3")
    if parent is None and b3 is not None and len(b3) == 1:
        parent = parse_b3_single(b3[0])
    multi = any(name.startswith(b"x-b3-") for name in found)
    if parent is None and multi:

        def one(name: bytes) -> bytes | None:
            values = found.get(name)
            return values[0] if values is not None and len(values) == 1 else None

        parent = parse_b3_multi(
            one(b"x-b3-traceid"), one(b"x-b3-spanid"), one(b"x-b3-sampled"), one(b"x-b3-flags")
        )
    return Incoming(parent, b3 is not None, multi)


def propagation_fields(
    trace_id: bytes,
    span_id: bytes,
    sampled: bool,
    tracestate: bytes,
    parent_span_id: bytes | None,
    formats: tuple[bool, bool],
) -> list[tuple[bytes, bytes]]:
    """The trace fields the proxy writes (ids in hex): `span_id` (its own) as the next
    hop's parent, in W3C always, and in B3 single / multi where `formats` ((b3,
    b3multi)) say so."""
    flag = b"1" if sampled else b"0"
    out = [(b"traceparent", b"00-" + trace_id + b"-" + span_id + (b"-01" if sampled else b"-00"))]
    if tracestate:
        out.append((b"tracestate", tracestate))
    b3, b3multi = formats
    if b3:
        single = b"%b-%b-%b" % (trace_id, span_id, flag)
        if parent_span_id is not None:
            single += b"-" + parent_span_id
        out.append((b"b3", single))
    if b3multi:
        out.append((b"x-b3-traceid", trace_id))
        out.append((b"x-b3-spanid", span_id))
        out.append((b"x-b3-sampled", flag))
        if parent_span_id is not None:
            out.append((b"x-b3-parentspanid", parent_span_id))
    return out
