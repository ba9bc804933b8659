"""The policy registry: every policy kind meshling knows, in the order it applies.

A policy lives in its own folder (`policies/<name>/`): the resource and its validation
(`parse_resource`), the pure conversion into a snapshot fragment (`to_snapshot`), the
data plane's decision, and tests with golden files. Adding a policy touches its folder
and one line of `POLICIES` here, nothing else.

Every policy also says which dataplanes a resource of it selects (`selects`, a pure
function returning a `selection.Selection`): the control plane refuses a policy that
selects none, unless asked to store it anyway.

The order of `POLICIES` is the order in which policies apply to traffic, which is also
the order of the proxy's layers: authorization comes first, so nothing else is spent on
a caller that is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from meshling.policies.selection import Selection

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane

R = TypeVar("R")  # the resource
F = TypeVar("F")  # the snapshot fragment


# Where a policy's fragment goes in a snapshot:
# - "authz": an inbound chain's `authz` (TrafficPermission, with its own `to_snapshot`);
# - "route": the outbound route to a destination service (`routes[].<key>`);
# - "cluster": the outbound cluster of a destination service (`clusters[].<key>`);
# - "chain": an inbound filter chain, as rules by caller (`filter_chains[].<key>`);
# - "routes": the outbound's routes themselves (HTTPRoute) or its TCP filter's clusters
#   (TCPRoute): the builder reads the fragment in place of its one route to the service;
# - "listener": every filter chain of the dataplane it selects, outbound and inbound
#   (AccessLog): `fragment(resources, mesh, dataplane, destination)` -> the chain's fields;
# - "proxy": the whole proxy, at the snapshot's top level (`<key>:`, Trace):
#   `fragment(resources selecting the dataplane, mesh, dataplane=(service, tags))` -> the
#   most specific one's section ({}: none).
Attach = Literal["authz", "route", "cluster", "chain", "routes", "listener", "proxy"]


@dataclass(frozen=True, slots=True)
class PolicyType(Generic[R, F]):
    """One policy kind: how to read its resources and what they become in a snapshot."""

    # the resource's `kind:`
    kind: str
    # (document, source) -> resource; raises SnapshotError naming source and field path
    parse_resource: Callable[[Any, str], R]
    # TrafficPermission: (resources of the mesh, destination service, mesh) -> the
    # service's fragment; None for the traffic policies, which use `fragment`
    to_snapshot: Callable[..., F] | None
    # (resource, dataplanes of its mesh) -> the dataplanes it applies to
    selects: Callable[[R, Iterable[Dataplane]], Selection]
    # where the fragment goes, and under which key of that snapshot object
    attach: Attach = "authz"
    key: str = ""
    # traffic policies ("route", "cluster"): the resource that governs a (source,
    # destination) pair, by `matching.best_match` -> its snapshot fragment document.
    # "chain": (the resources selecting the dataplane, most specific first, mesh) -> the
    # chain's fragment document
    fragment: Callable[..., dict[str, Any]] | None = None


# Every policy kind, in apply order; built on first use (see `__getattr__`), so that a
# proxy importing one policy's decisions does not load every policy, the identity
# stack and the control plane's parsers with it.
POLICIES: tuple[PolicyType[Any, Any], ...]


def _registry() -> tuple[PolicyType[Any, Any], ...]:
    from meshling.policies import (
        access_log,
        circuit_breaker,
        fault_injection,
        health_check,
        http_route,
        load_balancing,
        rate_limit,
        retry,
        tcp_route,
        timeout,
        trace,
        traffic_permission,
    )

    return (
        PolicyType(  # who may connect at all: first, before any other work
            traffic_permission.KIND,
            traffic_permission.parse_resource,
            traffic_permission.to_snapshot,
            traffic_permission.selects,
        ),
        PolicyType(  # how much a caller may send: refused before any work is spent on it
            rate_limit.KIND,
            rate_limit.parse_resource,
            None,
            rate_limit.selects,
            attach="chain",
            key="rate_limit",
            fragment=rate_limit.fragment,
        ),
        PolicyType(  # delays and aborts for admitted requests, before routing
            fault_injection.KIND,
            fault_injection.parse_resource,
            None,
            fault_injection.selects,
            attach="chain",
            key="fault",
            fragment=fault_injection.fragment,
        ),
        PolicyType(  # which backends of a service a request goes to: the route itself
            http_route.KIND,
            http_route.parse_resource,
            None,
            http_route.selects,
            attach="routes",
            key="http_route",
            fragment=http_route.fragment,
        ),
        PolicyType(  # which backends of a service a connection goes to
            tcp_route.KIND,
            tcp_route.parse_resource,
            None,
            tcp_route.selects,
            attach="routes",
            key="tcp_route",
            fragment=tcp_route.fragment,
        ),
        PolicyType(  # how long a call to a service may take, every attempt included
            timeout.KIND,
            timeout.parse_resource,
            None,
            timeout.selects,
            attach="route",
            key="timeout",
            fragment=timeout.fragment,
        ),
        PolicyType(  # which failed attempts are tried again, inside the timeout
            retry.KIND,
            retry.parse_resource,
            None,
            retry.selects,
            attach="route",
            key="retry",
            fragment=retry.fragment,
        ),
        PolicyType(  # limits on what a cluster carries, then which endpoints are ejected
            circuit_breaker.KIND,
            circuit_breaker.parse_resource,
            None,
            circuit_breaker.selects,
            attach="cluster",
            key="circuit_breaker",
            fragment=circuit_breaker.fragment,
        ),
        PolicyType(  # which endpoint of the cluster a request goes to
            load_balancing.KIND,
            load_balancing.parse_resource,
            None,
            load_balancing.selects,
            attach="cluster",
            key="load_balancing",
            fragment=load_balancing.fragment,
        ),
        PolicyType(  # out of band: which endpoints the balancer may pick from
            health_check.KIND,
            health_check.parse_resource,
            None,
            health_check.selects,
            attach="cluster",
            key="health_check",
            fragment=health_check.fragment,
        ),
        PolicyType(  # which exchanges and connections are logged, and where: wraps them all
            access_log.KIND,
            access_log.parse_resource,
            None,
            access_log.selects,
            attach="listener",
            key="access_log",
            fragment=access_log.fragment,
        ),
        PolicyType(  # one span per request through the proxy: wraps them all, like logs
            trace.KIND,
            trace.parse_resource,
            None,
            trace.selects,
            attach="proxy",
            key="tracing",
            fragment=trace.fragment,
        ),
    )


def registered() -> tuple[PolicyType[Any, Any], ...]:
    """`POLICIES`, built on the first call."""
    global POLICIES
    if "POLICIES" not in globals():
        POLICIES = _registry()
    return POLICIES


def __getattr__(name: str) -> Any:
    if name == "POLICIES":
        return registered()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def policy_type(kind: str) -> PolicyType[Any, Any] | None:
    """The registered policy for a resource's `kind:`, or None if there is none."""
    for policy in registered():
        if policy.kind == kind:
            return policy
    return None
