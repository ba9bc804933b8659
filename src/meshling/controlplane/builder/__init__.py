"""The snapshot builder: the mesh's resources -> the snapshot each proxy runs, as pure
functions (no I/O, no clock), so the same resources always give the same snapshot and
the same version.

* `snapshot` — `build`, one dataplane's snapshot document;
* `affected` — which dataplanes a change touches, so only their snapshots are rebuilt;
* `testdata/` — a golden mesh (`resources.yaml`) and the snapshot of each of its
  dataplanes (`<dataplane>.snapshot.yaml`).
"""

from meshling.controlplane.builder.affected import affected
from meshling.controlplane.builder.snapshot import BuildError, PolicyResource, build, version_of

__all__ = ["BuildError", "PolicyResource", "affected", "build", "version_of"]
