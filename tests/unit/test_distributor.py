"""The distributor: its core's decisions (no I/O), and its service driven through a fake
store and fake streams (no sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import pytest

from meshling.configstream import Push, decode_server
from meshling.controlplane.builder import build, canonical_json
from meshling.controlplane.distributor import Distributor, DistributorCore, Proxy
from meshling.controlplane.resources import (
    Dataplane,
    Inbound,
    Mesh,
    MeshTls,
    Outbound,
    parse_resource,
)
from meshling.controlplane.status import STATUS_KIND, StatusWriter
from meshling.controlplane.store import (
    RESYNC,
    AlreadyExists,
    Change,
    Conflict,
    NotFound,
    Resource,
    Watch,
)
from meshling.policies.traffic_permission import TrafficPermission
from meshling.policies.traffic_permission import parse_resource as parse_permission
from meshling.snapshot.model import TlsFiles

TLS = TlsFiles("/c.pem", "/k.pem", "/b.pem")


def dataplane(name: str, service: str, *, outbound: str | None = None, n: int = 1) -> Dataplane:
    return Dataplane(
        name=name,
        mesh="default",
        service=service,
        address=f"10.0.0.{n}",
        inbounds=(Inbound(15006, 8080, "http"),),
        outbounds=(Outbound(15001, outbound, "http"),) if outbound else (),
    )


def permission(name: str, destination: str, source: str) -> TrafficPermission:
    return parse_permission(
        {
            "kind": "TrafficPermission",
            "metadata": {"name": name, "mesh": "default"},
            "spec": {
                "destination": {"service": destination},
                "rules": [{"action": "allow", "sources": [{"service": source}]}],
            },
        },
        "test",
    )


MTLS = Mesh("default", MeshTls(enabled=True))
PLAIN = Mesh("default")


def core_with(mesh: Mesh, *dataplanes: Dataplane, tls: TlsFiles | None = TLS) -> DistributorCore:
    core = DistributorCore()
    core.reset([("Mesh", 1, mesh), *(("Dataplane", 1, d) for d in dataplanes)])
    for d in dataplanes:
        core.connect(Proxy((d.mesh, d.name), d, tls))
    return core


# the core


def test_distributor_core_pushes_once_per_version() -> None:
    api, web = dataplane("api-1", "api", n=1), dataplane("web-1", "web", outbound="api", n=2)
    core = core_with(MTLS, api, web)
    first = core.build([("default", "api-1"), ("default", "web-1")])
    assert [o.key for o in first] == [("default", "api-1"), ("default", "web-1")]
    for outcome in first:
        message = decode_server(outcome.frame or "")
        assert message.version == outcome.version  # type: ignore[union-attr]
    # nothing changed: nothing to send
    assert core.build([("default", "api-1"), ("default", "web-1")]) == []
    assert core.unchanged == 2


def test_distributor_core_permission_touches_its_destination_only() -> None:
    api, web = dataplane("api-1", "api", n=1), dataplane("web-1", "web", outbound="api", n=2)
    core = core_with(MTLS, api, web)
    core.build(list(core.proxies))
    touched = core.apply(
        "TrafficPermission", "default", "web-to-api", 1, permission("web-to-api", "api", "web")
    )
    assert touched == {("default", "api-1")}
    [outcome] = core.build(touched)
    assert outcome.key == ("default", "api-1")
    # deleting it touches the same proxy (the view still knew where it was)
    assert core.apply("TrafficPermission", "default", "web-to-api", 1, None) == touched


def test_distributor_core_ignores_a_state_older_than_the_one_held() -> None:
    api = dataplane("api-1", "api")
    core = core_with(PLAIN, api)
    moved = dataplane("api-1", "api", n=9)
    assert core.apply("Dataplane", "default", "api-1", 3, moved) == {("default", "api-1")}
    assert core.apply("Dataplane", "default", "api-1", 2, api) == set()
    assert core.dataplane("default", "api-1") == moved


def test_distributor_core_a_dataplane_moving_service_touches_both_sides() -> None:
    api = dataplane("api-1", "api", n=1)
    web = dataplane("web-1", "web", outbound="api", n=2)
    db_client = dataplane("cron-1", "cron", outbound="db", n=3)
    core = core_with(PLAIN, api, web, db_client)
    moved = dataplane("api-1", "db", n=1)
    touched = core.apply("Dataplane", "default", "api-1", 2, moved)
    assert touched == {("default", "api-1"), ("default", "web-1"), ("default", "cron-1")}
    outcomes = {o.key: o for o in core.build(touched)}
    snapshot = json.loads(outcomes[("default", "cron-1")].frame or "")["snapshot"]
    clusters = {c["name"]: c for c in snapshot["clusters"]}
    assert clusters["db"]["endpoints"] == [{"address": "10.0.0.1", "port": 15006}]


def test_distributor_core_refuses_mtls_without_files_and_waits_without_mesh() -> None:
    api = dataplane("api-1", "api")
    core = core_with(PLAIN, api, tls=None)
    assert len(core.build([("default", "api-1")])) == 1
    touched = core.apply("Mesh", "default", "default", 2, MTLS)
    [outcome] = core.build(touched)
    assert outcome.refusal is not None and "tls_paths" in outcome.refusal
    # the mesh deleted: the proxy keeps what it runs, nothing is sent
    touched = core.apply("Mesh", "default", "default", 3, None)
    assert touched == {("default", "api-1")}
    assert core.build(touched) == []


def test_distributor_core_other_meshes_are_untouched() -> None:
    core = core_with(PLAIN, dataplane("api-1", "api"))
    other = Dataplane("api-1", "other", "api", "10.0.0.5")
    core.reset([("Mesh", 1, PLAIN), ("Mesh", 1, Mesh("other")), ("Dataplane", 1, other)])
    assert core.apply("Mesh", "other", "other", 2, Mesh("other", MeshTls(True))) == set()


def test_distributor_core_an_equal_state_touches_nobody() -> None:
    api = dataplane("api-1", "api", n=1)
    web = dataplane("web-1", "web", outbound="api", n=2)
    core = core_with(MTLS, api, web)
    core.build(list(core.proxies))
    # a proxy re-registering what it had, or with other labels: no snapshot can change
    assert core.apply("Dataplane", "default", "api-1", 2, api) == set()
    relabelled = dataclasses.replace(api, labels={"team": "a"})
    assert core.apply("Dataplane", "default", "api-1", 3, relabelled) == set()
    assert core.dataplane("default", "api-1") == relabelled
    # the version moved on: an older state is still ignored
    assert core.apply("Dataplane", "default", "api-1", 2, dataplane("api-1", "api", n=7)) == set()
    # a change the builder reads touches its callers
    moved = dataplane("api-1", "api", n=9)
    assert core.apply("Dataplane", "default", "api-1", 4, moved) == {
        ("default", "api-1"),
        ("default", "web-1"),
    }
    [outcome] = [o for o in core.build(list(core.proxies)) if o.key == ("default", "web-1")]
    snapshot = json.loads(outcome.frame or "")["snapshot"]
    assert {c["name"]: c for c in snapshot["clusters"]}["api"]["endpoints"] == [
        {"address": "10.0.0.9", "port": 15006}
    ]


def test_distributor_core_frames_carry_the_builders_document() -> None:
    api, web = dataplane("api-1", "api", n=1), dataplane("web-1", "web", outbound="api", n=2)
    core = core_with(MTLS, api, web)
    core.apply("TrafficPermission", "default", "p", 1, permission("p", "api", "web"))
    policies = [permission("p", "api", "web")]
    for outcome in core.build(list(core.proxies)):
        proxy = core.proxies[outcome.key]
        expected = build(proxy.dataplane, MTLS, [api, web], policies, TLS)
        message = decode_server(outcome.frame or "")
        assert isinstance(message, Push)
        assert (message.version, message.snapshot) == (expected["version"], expected)
        # sent as canonical JSON: what the version hashes, plus the version
        assert proxy.text == canonical_json(expected)
        assert proxy.snapshot == expected
        assert core.preview(*outcome.key, TLS) == expected


def test_distributor_core_shares_one_index_per_mesh_until_it_changes() -> None:
    core = core_with(PLAIN, *(dataplane(f"api-{n}", "api", n=n) for n in range(1, 4)))
    core.build(list(core.proxies))
    index = core._index("default")
    assert index is not None and core._index("default") is index
    core.apply("Dataplane", "default", "api-1", 1, dataplane("api-1", "api", n=1))
    assert core._index("default") is index  # an equal state keeps it
    core.apply("Dataplane", "default", "api-1", 2, dataplane("api-1", "api", n=8))
    assert core._index("default") is not index


def traffic_policy(kind: str, name: str, source: str, destination: str, conf: Any) -> Any:
    return parse_resource(
        {
            "kind": kind,
            "metadata": {"name": name, "mesh": "default"},
            "spec": {
                "sources": [{"service": source}],
                "destinations": [{"service": destination}],
                "conf": conf,
            },
        },
        "test",
    )


def test_distributor_core_outbound_policy_touches_its_callers_and_reverts() -> None:
    api, web = dataplane("api-1", "api", n=1), dataplane("web-1", "web", outbound="api", n=2)
    core = core_with(MTLS, api, web)
    core.build(list(core.proxies))
    original = core.proxies[("default", "web-1")].version
    retry = traffic_policy("Retry", "web-to-api", "web", "api", {"max_attempts": 3})
    touched = core.apply("Retry", "default", "web-to-api", 1, retry)
    assert touched == {("default", "web-1")}  # the caller's proxy, not api's
    [outcome] = core.build(touched)
    snapshot = json.loads(outcome.frame or "")["snapshot"]
    routes = snapshot["listeners"][1]["filter_chains"][0]["http"]["route_config"]
    assert routes["virtual_hosts"][0]["routes"][0]["retry"]["max_attempts"] == 3
    # deleted: the same proxy, back to the snapshot it had
    assert core.apply("Retry", "default", "web-to-api", 2, None) == touched
    [outcome] = core.build(touched)
    assert outcome.version == original


def test_distributor_core_inbound_policy_touches_its_destinations() -> None:
    api, web = dataplane("api-1", "api", n=1), dataplane("web-1", "web", outbound="api", n=2)
    core = core_with(PLAIN, api, web)
    core.build(list(core.proxies))
    limit = traffic_policy(
        "RateLimit", "api-limit", "*", "api", {"local": {"requests": 5, "interval": "1s"}}
    )
    touched = core.apply("RateLimit", "default", "api-limit", 1, limit)
    assert touched == {("default", "api-1")}
    [outcome] = core.build(touched)
    chain = json.loads(outcome.frame or "")["snapshot"]["listeners"][0]["filter_chains"][0]
    assert [r["name"] for r in chain["rate_limit"]["rules"]] == ["api-limit"]
    # a policy of the same name and another kind is another resource
    fault = traffic_policy(
        "FaultInjection", "api-limit", "web", "web", {"delay": {"percentage": 100, "value": "1s"}}
    )
    assert core.apply("FaultInjection", "default", "api-limit", 1, fault) == {("default", "web-1")}
    assert core.apply("RateLimit", "default", "api-limit", 2, None) == {("default", "api-1")}


def test_distributor_core_caller_tags_change_its_governing_policy() -> None:
    api, web = dataplane("api-1", "api", n=1), dataplane("web-1", "web", outbound="api", n=2)
    core = core_with(PLAIN, api, web)
    canary = traffic_policy("Retry", "canary", "web", "api", {"max_attempts": 2})
    canary = dataclasses.replace(
        canary, sources=(dataclasses.replace(canary.sources[0], tags={"version": "v2"}),)
    )
    core.apply("Retry", "default", "canary", 1, canary)
    assert core.apply("Retry", "default", "canary", 1, canary) == set()
    core.build(list(core.proxies))
    tagged = dataclasses.replace(web, tags={"version": "v2"})
    touched = core.apply("Dataplane", "default", "web-1", 2, tagged)
    assert ("default", "web-1") in touched
    [outcome] = [o for o in core.build(touched) if o.key == ("default", "web-1")]
    snapshot = json.loads(outcome.frame or "")["snapshot"]
    route = snapshot["listeners"][1]["filter_chains"][0]["http"]["route_config"]
    assert route["virtual_hosts"][0]["routes"][0]["retry"]["max_attempts"] == 2


# the service, on fakes


class FakeStore:
    """An in-memory store: enough of the interface for the distributor."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str, str], Resource] = {}
        self.watches: list[Watch] = []
        self.gets = 0
        self.lists = 0
        self.patches: list[int] = []

    def _changed(self, kind: str, mesh: str, name: str, version: int, op: Any) -> None:
        for w in self.watches:
            w.deliver(Change(kind, mesh, name, version, op))

    async def create(
        self,
        kind: str,
        mesh: str,
        name: str,
        spec: dict[str, Any],
        labels: dict[str, str] | None = None,
    ) -> Resource:
        if (kind, mesh, name) in self.items:
            raise AlreadyExists(kind, mesh, name)
        now = dt.datetime.now(dt.UTC)
        resource = Resource(kind, mesh, name, labels or {}, spec, 1, now, now)
        self.items[(kind, mesh, name)] = resource
        self._changed(kind, mesh, name, 1, "created")
        return resource

    async def get(self, kind: str, mesh: str, name: str) -> Resource:
        self.gets += 1
        try:
            return self.items[(kind, mesh, name)]
        except KeyError:
            raise NotFound(kind, mesh, name) from None

    async def list(
        self, kind: str, mesh: str | None = None, selector: dict[str, str] | None = None
    ) -> list[Resource]:
        self.lists += 1
        return [r for (k, m, _), r in sorted(self.items.items()) if k == kind and mesh in (None, m)]

    async def update(
        self,
        kind: str,
        mesh: str,
        name: str,
        spec: dict[str, Any],
        labels: dict[str, str] | None = None,
        *,
        version: int,
    ) -> Resource:
        old = await self.get(kind, mesh, name)
        if old.version != version:
            raise Conflict(kind, mesh, name, current=old.version, given=version)
        resource = Resource(
            kind,
            mesh,
            name,
            old.labels if labels is None else labels,
            spec,
            version + 1,
            old.created,
            dt.datetime.now(dt.UTC),
        )
        self.items[(kind, mesh, name)] = resource
        self._changed(kind, mesh, name, version + 1, "updated")
        return resource

    async def delete(self, kind: str, mesh: str, name: str, *, version: int | None = None) -> None:
        old = self.items.pop((kind, mesh, name))
        self._changed(kind, mesh, name, old.version, "deleted")

    async def patch_many(
        self, kind: str, patches: Sequence[tuple[str, str, dict[str, Any]]]
    ) -> None:
        self.patches.append(len(patches))
        now = dt.datetime.now(dt.UTC)
        for mesh, name, patch in patches:
            old = self.items.get((kind, mesh, name))
            spec = {**(old.spec if old else {}), **patch}
            version = old.version + 1 if old else 1
            self.items[(kind, mesh, name)] = Resource(kind, mesh, name, {}, spec, version, now, now)

    async def watch(self) -> Watch:
        w = Watch(self.watches.remove)
        self.watches.append(w)
        return w

    async def close(self) -> None:
        for w in self.watches:
            w.end()


class FakeStream:
    def __init__(self) -> None:
        self.offered: list[str] = []
        self.refused: tuple[str, str, int] | None = None

    def offer(self, version: str, frame: str) -> None:
        self.offered.append(version)

    def refuse(self, reason: str, message: str, code: int) -> None:
        self.refused = (reason, message, code)


def document(d: Dataplane) -> dict[str, Any]:
    return {
        "service": d.service,
        "address": d.address,
        "inbounds": [
            {"port": i.port, "service_port": i.service_port, "protocol": i.protocol}
            for i in d.inbounds
        ],
        "outbounds": [
            {"port": o.port, "service": o.service, "protocol": o.protocol} for o in d.outbounds
        ],
    }


async def started(store: FakeStore) -> Distributor:
    distributor = Distributor(
        store,  # type: ignore[arg-type]
        StatusWriter(store, flush_interval=0.01),  # type: ignore[arg-type]
        replica="r1",
        offline_after=30,
    )
    await distributor.start()
    return distributor


async def settle(seconds: float = 0.15) -> None:
    await asyncio.sleep(seconds)


def test_distributor_coalesces_a_burst_into_one_build_per_proxy() -> None:
    async def body() -> None:
        store = FakeStore()
        await store.create("Mesh", "default", "default", {})
        distributor = await started(store)
        streams = {}
        for n in range(20):
            d = dataplane(f"api-{n}", "api", n=n + 1)
            resource = await store.create("Dataplane", "default", d.name, document(d))
            streams[d.name] = FakeStream()
            distributor.register(
                d,
                resource.version,
                None,
                service="api",
                jti="j",
                stream=streams[d.name],
                applied=None,
            )
        await settle()
        assert all(len(s.offered) == 1 for s in streams.values())
        builds = distributor.core.builds
        # a burst of 50 permissions, each touching every api proxy
        for n in range(50):
            await store.create(
                "TrafficPermission",
                "default",
                f"p{n}",
                {
                    "destination": {"service": "api"},
                    "rules": [{"action": "allow", "sources": [{"service": f"s{n}"}]}],
                },
            )
        await settle()
        # one rebuild per proxy, not 50; mTLS is off, so permissions change no snapshot
        assert distributor.core.builds - builds == 20
        assert all(len(s.offered) == 1 for s in streams.values())
        await distributor.close()

    asyncio.run(asyncio.wait_for(body(), 10))


def test_distributor_pushes_a_change_to_the_affected_proxies_only() -> None:
    async def body() -> None:
        store = FakeStore()
        await store.create("Mesh", "default", "default", {})
        distributor = await started(store)
        streams = {}
        for d in (
            dataplane("api-1", "api", n=1),
            dataplane("web-1", "web", outbound="api", n=2),
            dataplane("db-1", "db", n=3),
        ):
            resource = await store.create("Dataplane", "default", d.name, document(d))
            streams[d.name] = FakeStream()
            distributor.register(
                d,
                resource.version,
                None,
                service=d.service,
                jti="j",
                stream=streams[d.name],
                applied=None,
            )
        await settle()
        before = {name: len(s.offered) for name, s in streams.items()}
        # a second api instance: web gets a new endpoint; db and api-1 are untouched
        api2 = dataplane("api-2", "api", n=4)
        await store.create("Dataplane", "default", "api-2", document(api2))
        await settle()
        after = {name: len(s.offered) for name, s in streams.items()}
        assert after == {**before, "web-1": before["web-1"] + 1}
        await distributor.close()

    asyncio.run(asyncio.wait_for(body(), 10))


def test_distributor_loads_traffic_policies_from_the_store() -> None:
    async def body() -> None:
        store = FakeStore()
        await store.create("Mesh", "default", "default", {})
        # stored before the distributor starts: read by its first list
        await store.create(
            "Timeout",
            "default",
            "web-to-api",
            {
                "sources": [{"service": "web"}],
                "destinations": [{"service": "api"}],
                "conf": {"request": "2s"},
            },
        )
        distributor = await started(store)
        streams = {}
        for d in (dataplane("api-1", "api", n=1), dataplane("web-1", "web", outbound="api", n=2)):
            resource = await store.create("Dataplane", "default", d.name, document(d))
            streams[d.name] = FakeStream()
            distributor.register(
                d,
                resource.version,
                None,
                service=d.service,
                jti="j",
                stream=streams[d.name],
                applied=None,
            )
        await settle()
        web = distributor.core.proxies[("default", "web-1")].snapshot or {}
        route = web["listeners"][1]["filter_chains"][0]["http"]["route_config"]
        assert route["virtual_hosts"][0]["routes"][0]["timeout"]["request"] == "2s"
        before = {name: len(s.offered) for name, s in streams.items()}
        # a RateLimit through the watch: api's proxy only
        await store.create(
            "RateLimit",
            "default",
            "api-limit",
            {
                "sources": [{"service": "*"}],
                "destinations": [{"service": "api"}],
                "conf": {"local": {"requests": 5, "interval": "1s"}},
            },
        )
        await settle()
        after = {name: len(s.offered) for name, s in streams.items()}
        assert after == {**before, "api-1": before["api-1"] + 1}
        api = distributor.core.proxies[("default", "api-1")].snapshot or {}
        assert "rate_limit" in api["listeners"][0]["filter_chains"][0]
        await distributor.close()

    asyncio.run(asyncio.wait_for(body(), 10))


def test_distributor_resync_relists_and_pushes_what_was_missed() -> None:
    async def body() -> None:
        store = FakeStore()
        await store.create("Mesh", "default", "default", {})
        distributor = await started(store)
        web = dataplane("web-1", "web", outbound="api", n=2)
        resource = await store.create("Dataplane", "default", "web-1", document(web))
        stream = FakeStream()
        distributor.register(
            web, resource.version, None, service="web", jti="j", stream=stream, applied=None
        )
        await settle()
        pushes = len(stream.offered)
        # a write the watch never reports (as while a PostgreSQL listener was down)
        watches, store.watches = store.watches, []
        await store.create("Dataplane", "default", "api-1", document(dataplane("api-1", "api")))
        store.watches = watches
        await settle()
        assert len(stream.offered) == pushes
        for w in store.watches:
            w.deliver(RESYNC)
        await settle()
        assert len(stream.offered) == pushes + 1
        assert distributor.resyncs == 2  # the start, and this one
        await distributor.close()

    asyncio.run(asyncio.wait_for(body(), 10))


def test_distributor_status_is_batched_and_ignored_by_the_builder() -> None:
    async def body() -> None:
        store = FakeStore()
        await store.create("Mesh", "default", "default", {})
        distributor = await started(store)
        sessions = []
        for n in range(100):
            d = dataplane(f"api-{n}", "api", n=n + 1)
            resource = await store.create("Dataplane", "default", d.name, document(d))
            stream = FakeStream()
            sessions.append(
                distributor.register(
                    d, resource.version, None, service="api", jti="j", stream=stream, applied=None
                )
            )
        await settle()
        builds = distributor.core.builds
        store.patches.clear()
        for session in sessions:
            assert distributor.ack(session, session.pushed[-1])
        assert not distributor.ack(sessions[0], "not-pushed")
        await settle()
        assert store.patches == [100]  # one transaction for a hundred ACKs
        assert distributor.core.builds == builds  # status writes trigger no rebuild
        status = store.items[(STATUS_KIND, "default", "api-0")].spec
        assert status["applied"] == sessions[0].pushed[-1]
        assert status["connected"] is True and status["replica"] == "r1"
        distributor.nack(sessions[1], sessions[1].pushed[-1], "port in use")
        distributor.unregister(sessions[2])
        await settle()
        assert store.items[(STATUS_KIND, "default", "api-1")].spec["last_nack"]["reason"] == (
            "port in use"
        )
        assert store.items[(STATUS_KIND, "default", "api-2")].spec["connected"] is False
        await distributor.close()
        assert store.items[(STATUS_KIND, "default", "api-3")].spec["connected"] is False

    asyncio.run(asyncio.wait_for(body(), 10))


def test_distributor_a_second_stream_supersedes_the_first() -> None:
    async def body() -> None:
        store = FakeStore()
        await store.create("Mesh", "default", "default", {})
        distributor = await started(store)
        d = dataplane("api-1", "api")
        resource = await store.create("Dataplane", "default", "api-1", document(d))
        first, second = FakeStream(), FakeStream()
        old = distributor.register(
            d, resource.version, None, service="api", jti="j", stream=first, applied=None
        )
        distributor.register(
            d, resource.version, None, service="api", jti="j", stream=second, applied=None
        )
        assert first.refused is not None and first.refused[2] == 4409
        distributor.unregister(old)  # the old stream's end must not mark it disconnected
        await settle()
        assert store.items[(STATUS_KIND, "default", "api-1")].spec["connected"] is True
        await distributor.close()

    asyncio.run(asyncio.wait_for(body(), 10))


def test_distributor_revocation_closes_the_streams_of_that_token() -> None:
    async def body() -> None:
        store = FakeStore()
        await store.create("Mesh", "default", "default", {})
        distributor = await started(store)
        d = dataplane("api-1", "api")
        resource = await store.create("Dataplane", "default", "api-1", document(d))
        stream = FakeStream()
        distributor.register(
            d, resource.version, None, service="api", jti="abc", stream=stream, applied=None
        )
        await store.create("TokenRevocation", "default", "abc", {"jti": "abc"})
        await settle()
        assert stream.refused is not None and stream.refused[:1] == ("unauthenticated",)
        await distributor.close()

    asyncio.run(asyncio.wait_for(body(), 10))


@pytest.mark.parametrize("proxies", [1000])
def test_distributor_core_rebuilds_a_thousand_proxies_quickly(proxies: int) -> None:
    """A permission touching every proxy of a 1000-proxy mesh: the build cost behind the
    p99 <= 1 s target (measured end to end over sockets in test_cp_scale)."""
    import time

    dataplanes = [
        dataplane(f"svc{n % 50}-{n}", f"svc{n % 50}", outbound=f"svc{(n + 1) % 50}", n=n % 250)
        for n in range(proxies)
    ]
    core = core_with(MTLS, *dataplanes)
    core.build(list(core.proxies))
    touched = core.apply("TrafficPermission", "default", "all", 1, permission("all", "*", "svc1"))
    assert len(touched) == proxies
    start = time.perf_counter()
    outcomes = core.build(touched)
    elapsed = time.perf_counter() - start
    assert len(outcomes) == proxies
    assert elapsed < 2.0, f"{elapsed:.2f}s to rebuild {proxies} snapshots"


def test_distributor_registering_the_stored_dataplane_builds_only_its_own_snapshot() -> None:
    async def body() -> None:
        store = FakeStore()
        await store.create("Mesh", "default", "default", {})
        callers = [dataplane(f"web-{n}", "web", outbound="api", n=n + 10) for n in range(5)]
        api = dataplane("api-1", "api")
        for d in [*callers, api]:
            await store.create("Dataplane", "default", d.name, document(d))
        distributor = await started(store)
        streams = {d.name: FakeStream() for d in callers}
        for d in callers:
            held = store.items[("Dataplane", "default", d.name)]
            distributor.register(
                d, held.version, None, service="web", jti="j", stream=streams[d.name], applied=None
            )
        await settle()
        builds = distributor.core.builds
        # api-1 was stored before (the API, or an earlier stream): its callers keep theirs
        held = store.items[("Dataplane", "default", "api-1")]
        distributor.register(
            api, held.version, None, service="api", jti="j", stream=FakeStream(), applied=None
        )
        await settle()
        assert distributor.core.builds - builds == 1
        assert all(len(s.offered) == 1 for s in streams.values())
        await distributor.close()

    asyncio.run(asyncio.wait_for(body(), 10))


def test_distributor_token_expiry_closes_the_stream() -> None:
    async def body() -> None:
        store = FakeStore()
        await store.create("Mesh", "default", "default", {})
        now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        distributor = Distributor(
            store,  # type: ignore[arg-type]
            StatusWriter(store, flush_interval=0.01),  # type: ignore[arg-type]
            replica="r1",
            offline_after=30,
            clock=lambda: now,
        )
        await distributor.start()
        streams = {name: FakeStream() for name in ("api-1", "api-2", "api-3")}
        sessions = {}
        for n, (name, expires) in enumerate(
            [
                ("api-1", now + dt.timedelta(seconds=0.05)),
                ("api-2", now + dt.timedelta(hours=1)),
                ("api-3", now + dt.timedelta(seconds=0.05)),
            ]
        ):
            d = dataplane(name, "api", n=n + 1)
            resource = await store.create("Dataplane", "default", name, document(d))
            sessions[name] = distributor.register(
                d,
                resource.version,
                None,
                service="api",
                jti=name,
                stream=streams[name],
                applied=None,
                expires=expires,
            )
        distributor.unregister(sessions["api-3"])  # ended before its token expired
        await settle()
        refused = streams["api-1"].refused
        assert refused is not None
        reason, message, code = refused
        assert (reason, code) == ("unauthenticated", 4401)
        assert "expired at 2026-01-01T00:00:00Z" in message and "token file" in message
        assert streams["api-2"].refused is None and streams["api-3"].refused is None
        await distributor.close()

    asyncio.run(asyncio.wait_for(body(), 10))
