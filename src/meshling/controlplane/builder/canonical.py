"""Canonical JSON: the one text of a snapshot document, which its version hashes and the
config stream sends.

Keys sorted, no spaces, ASCII only: equal documents give equal bytes whatever order their
mappings were built in. `object_json` composes an object's text from its members' texts,
made earlier and possibly shared (the endpoints of a service, the same in every snapshot
with an outbound to it), with the same result as serialising the whole object at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def canonical_json(document: Any) -> str:
    """The canonical JSON text of a JSON-able value."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def object_json(members: Mapping[str, str]) -> str:
    """The canonical JSON text of an object, from the canonical text of each member."""
    return "{" + ",".join(f"{json.dumps(key)}:{members[key]}" for key in sorted(members)) + "}"
