"""The proxy configuration snapshot: model and loader."""

from meshling.snapshot.load import SnapshotError, from_dict, load
from meshling.snapshot.model import Snapshot

__all__ = ["Snapshot", "SnapshotError", "from_dict", "load"]
