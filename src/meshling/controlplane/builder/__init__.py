"""The snapshot builder: the mesh's resources -> the snapshot each proxy runs, as pure
functions (no I/O, no clock), so the same resources always give the same snapshot and
the same version.

* `snapshot` — `build`, one dataplane's snapshot document (`build_text`: the same as
  canonical JSON, with its version, for the config stream);
* `index` — `MeshIndex`, what every snapshot of a mesh reads, made once for all of them;
* `canonical` — the one JSON text of a snapshot, which its version hashes;
* `affected` — which dataplanes a change touches, so only their snapshots are rebuilt;
* `testdata/` — golden meshes and the snapshot of each of their dataplanes: one with
  permissions (`resources.yaml`, `<dataplane>.snapshot.yaml`), one with every traffic
  policy kind (`policies.resources.yaml`, `<dataplane>.policies.snapshot.yaml`).
"""

from meshling.controlplane.builder.affected import affected
from meshling.controlplane.builder.canonical import canonical_json
from meshling.controlplane.builder.index import MeshIndex, PolicyResource, policy_of
from meshling.controlplane.builder.snapshot import (
    BuildError,
    SnapshotText,
    build,
    build_text,
    version_of,
)

__all__ = [
    "BuildError",
    "MeshIndex",
    "PolicyResource",
    "SnapshotText",
    "affected",
    "build",
    "build_text",
    "canonical_json",
    "policy_of",
    "version_of",
]
