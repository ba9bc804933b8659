"""The distributor's decisions, without I/O: the resources the builder reads, the proxies
connected here, and which snapshots to (re)build and push after a change.

Everything is a plain method call returning values: `reset` (a full re-list), `apply`
(one resource's new state) and `connect`/`disconnect` return the proxies to rebuild;
`build` returns, for those, the pushes to send (only where the version changed) and the
refusals (a snapshot that cannot be built). The I/O layer (`service`) reads the store,
feeds this, and writes to sockets.

The view holds every kind the control plane accepts (`resources.kinds()`: Mesh,
Dataplane and each registered policy kind, the traffic policies included), the policies
by (kind, name): two policies of one name and different kinds are two resources.

A resource's state is kept with its store version, so a late re-read never replaces a
newer state: `apply` of a version older than the one held changes nothing, and neither
does one equal, for the builder, to the state held (a proxy re-registering the dataplane
it had, a re-list): no snapshot can change.

Snapshots are built from one `MeshIndex` per mesh, made on the first build after a
change to the mesh and shared by every build until the next: a change touching all N
proxies reads the mesh once, not N times. A snapshot is serialised once, to canonical
JSON: the same text gives its version and is the push frame's snapshot.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from meshling.configstream import encode_push
from meshling.controlplane.builder import (
    BuildError,
    MeshIndex,
    PolicyResource,
    SnapshotText,
    affected,
    build,
    build_text,
)
from meshling.controlplane.resources import DATAPLANE_KIND, MESH_KIND, Dataplane, Mesh
from meshling.snapshot.model import TlsFiles

Key = tuple[str, str]  # (mesh, dataplane name)
Resource = Mesh | Dataplane | PolicyResource


@dataclass(slots=True)
class Proxy:
    """A proxy with a stream on this replica."""

    key: Key
    # the dataplane it registered with; its snapshot is built from the stored one when
    # there is one (an operator may have changed it), else from this
    dataplane: Dataplane
    tls: TlsFiles | None
    # the last snapshot built for it: its version, and its canonical JSON (text, not the
    # document: a fifth of the memory, and it is read only to inspect the proxy)
    version: str | None = None
    text: str | None = None

    @property
    def snapshot(self) -> dict[str, Any] | None:
        """The last snapshot built for it, as a document."""
        return None if self.text is None else dict(json.loads(self.text))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to send one proxy: a push (`frame` is its encoded message), or a refusal."""

    key: Key
    version: str | None = None
    frame: str | None = None
    refusal: str | None = None


@dataclass(slots=True)
class _MeshView:
    mesh: tuple[int, Mesh] | None = None
    dataplanes: dict[str, tuple[int, Dataplane]] = field(default_factory=dict)
    policies: dict[tuple[str, str], tuple[int, PolicyResource]] = field(default_factory=dict)
    # made from the above on the first build after a change, shared until the next
    index: MeshIndex | None = None


def _mesh_of(resource: Resource) -> str:
    return resource.name if isinstance(resource, Mesh) else resource.mesh


class DistributorCore:
    """The resource view and the connected proxies of one replica."""

    def __init__(self) -> None:
        self._meshes: dict[str, _MeshView] = {}
        self.proxies: dict[Key, Proxy] = {}
        # how many snapshots `build` computed, and how many it found unchanged
        self.builds = 0
        self.unchanged = 0

    # the view

    def reset(self, resources: Iterable[tuple[str, int, Resource]]) -> set[Key]:
        """Replace the whole view with `(kind, version, resource)`s; every proxy is to be
        rebuilt (those whose snapshot did not change get no push)."""
        self._meshes = {}
        for kind, version, resource in resources:
            self._put(kind, _mesh_of(resource), resource.name, version, resource)
        return set(self.proxies)

    def apply(
        self, kind: str, mesh: str, name: str, version: int, resource: Resource | None
    ) -> set[Key]:
        """The resource (kind, mesh, name) is `resource` at `version` (None: absent since
        `version`). Returns the connected proxies whose snapshot it can alter."""
        view = self._meshes.get(mesh)
        held = self._held(view, kind, name)
        if held is not None and held[0] > version:
            return set()  # a newer state is already here
        before = held[1] if held is not None else None
        if before is not None and resource is not None and _same_to_the_builder(before, resource):
            self._put(kind, mesh, name, version, resource)
            return set()
        names = self._affected(kind, mesh, name, before, resource)
        self._put(kind, mesh, name, version, resource)
        self._meshes[mesh].index = None
        return {key for key in self.proxies if key[0] == mesh and key[1] in names}

    def mesh(self, name: str) -> Mesh | None:
        view = self._meshes.get(name)
        return view.mesh[1] if view is not None and view.mesh is not None else None

    def dataplane(self, mesh: str, name: str) -> Dataplane | None:
        view = self._meshes.get(mesh)
        held = view.dataplanes.get(name) if view is not None else None
        return held[1] if held is not None else None

    def _held(self, view: _MeshView | None, kind: str, name: str) -> tuple[int, Resource] | None:
        if view is None:
            return None
        if kind == MESH_KIND:
            return view.mesh
        if kind == DATAPLANE_KIND:
            return view.dataplanes.get(name)
        return view.policies.get((kind, name))

    def _put(
        self, kind: str, mesh: str, name: str, version: int, resource: Resource | None
    ) -> None:
        view = self._meshes.setdefault(mesh, _MeshView())
        if kind == MESH_KIND:
            view.mesh = (version, resource) if isinstance(resource, Mesh) else None
        elif kind == DATAPLANE_KIND:
            if isinstance(resource, Dataplane):
                view.dataplanes[name] = (version, resource)
            else:
                view.dataplanes.pop(name, None)
        elif resource is not None and not isinstance(resource, (Mesh, Dataplane)):
            view.policies[(kind, name)] = (version, resource)
        else:
            view.policies.pop((kind, name), None)

    def _affected(
        self, kind: str, mesh: str, name: str, before: Resource | None, after: Resource | None
    ) -> set[str]:
        view = self._meshes.get(mesh, _MeshView())
        dataplanes = [d for _, d in view.dataplanes.values()]
        policies = [p for _, p in view.policies.values()]
        for version in (before, after):
            if isinstance(version, Dataplane):
                dataplanes.append(version)
            elif version is not None and not isinstance(version, Mesh):
                policies.append(version)
        # the proxies' own registrations count too: a proxy whose dataplane an operator
        # deleted still runs, and still reads the mesh
        dataplanes += [p.dataplane for p in self.proxies.values() if p.key[0] == mesh]
        try:
            return affected(kind, name, dataplanes, policies)
        except ValueError:  # a kind the builder does not know yet: every proxy
            return {d.name for d in dataplanes}

    # the proxies

    def connect(self, proxy: Proxy) -> None:
        """A stream registered `proxy` (replacing any earlier one of its key)."""
        self.proxies[proxy.key] = proxy

    def disconnect(self, proxy: Proxy) -> None:
        if self.proxies.get(proxy.key) is proxy:
            del self.proxies[proxy.key]

    def build(self, keys: Iterable[Key]) -> list[Outcome]:
        """Rebuild the snapshots of `keys`; the pushes for those whose version changed,
        and a refusal for those that cannot be built. A proxy whose mesh is gone keeps
        what it runs (nothing is sent)."""
        outcomes: list[Outcome] = []
        for key in sorted(keys):
            proxy = self.proxies.get(key)
            if proxy is None:
                continue
            index = self._index(key[0])
            if index is None:
                continue
            self.builds += 1
            dataplane = self.dataplane(*proxy.key) or proxy.dataplane
            try:
                built: SnapshotText = build_text(dataplane, index, proxy.tls)
            except BuildError as e:
                outcomes.append(Outcome(key, refusal=str(e)))
                continue
            if built.version == proxy.version:
                self.unchanged += 1
                continue
            proxy.version, proxy.text = built.version, built.text
            outcomes.append(Outcome(key, built.version, encode_push(built.version, built.text)))
        return outcomes

    def preview(self, mesh_name: str, name: str, tls: TlsFiles | None) -> dict[str, Any] | str:
        """The snapshot a dataplane would get now, or why it cannot get one."""
        proxy = self.proxies.get((mesh_name, name))
        snapshot = proxy.snapshot if proxy is not None else None
        if snapshot is not None:
            return snapshot
        index = self._index(mesh_name)
        if index is None:
            return f"mesh {mesh_name!r} does not exist"
        dataplane = self.dataplane(mesh_name, name)
        if dataplane is None:
            return f"dataplane {name!r} does not exist in mesh {mesh_name!r}"
        try:
            return build(dataplane, index.mesh, (), (), tls, index=index)
        except BuildError as e:
            return str(e)

    def _index(self, mesh_name: str) -> MeshIndex | None:
        """The mesh's index, made now if a change dropped it; None without the mesh."""
        view = self._meshes.get(mesh_name)
        if view is None or view.mesh is None:
            return None
        if view.index is None:
            view.index = MeshIndex(
                view.mesh[1],
                (d for _, d in view.dataplanes.values()),
                (p for _, p in view.policies.values()),
            )
        return view.index


def _same_to_the_builder(before: Resource, after: Resource) -> bool:
    """Whether two states of a resource make the same snapshots."""
    if isinstance(before, Dataplane) and isinstance(after, Dataplane):
        # labels select resources (`meshling get -l`); no snapshot reads them
        return before == dataclasses.replace(after, labels=before.labels)
    return before == after
