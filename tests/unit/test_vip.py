from __future__ import annotations

import ipaddress

import pytest

from meshling.dns.vip import allocate


def test_a_service_keeps_its_address_whatever_else_is_in_the_mesh() -> None:
    alone = allocate(["api"], "default")
    crowded = allocate(["web", "api", "store", *(f"s{i}" for i in range(500))], "default")
    assert alone["api"] == crowded["api"]
    assert ipaddress.IPv4Address(alone["api"]) in ipaddress.IPv4Network("240.0.0.0/4")


def test_meshes_get_different_addresses_for_one_name() -> None:
    assert allocate(["api"], "default")["api"] != allocate(["api"], "other")["api"]


def test_collisions_are_resolved_by_name_order_in_a_tiny_range() -> None:
    # a /29 has 6 hosts: eight names cannot all fit, six can and must all differ
    six = allocate([f"s{i}" for i in range(6)], "m", "10.0.0.0/29")
    assert len(set(six.values())) == 6
    for address in six.values():
        assert address not in ("10.0.0.0", "10.0.0.7")
    with pytest.raises(ValueError, match="no free virtual IP"):
        allocate([f"s{i}" for i in range(7)], "m", "10.0.0.0/29")
