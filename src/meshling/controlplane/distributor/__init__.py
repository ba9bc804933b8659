"""The distributor: keeps every connected proxy's snapshot current, and pushes it.

* `core` — `DistributorCore`, the decisions without I/O: the builder's view of the
  resources, the connected proxies, what a change touches, what to push;
* `service` — `Distributor`, the I/O around it: the store's watch, batching, the
  streams, and their status;
* `stream` — the WebSocket endpoint proxies connect to (`/api/v1/stream`).
"""

from meshling.controlplane.distributor.core import DistributorCore, Outcome, Proxy
from meshling.controlplane.distributor.service import Distributor, Session, Stream, replica_id

__all__ = ["Distributor", "DistributorCore", "Outcome", "Proxy", "Session", "Stream", "replica_id"]
