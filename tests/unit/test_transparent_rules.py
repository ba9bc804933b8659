"""The capture rules generator: what `meshling transparent install|uninstall` applies."""

from __future__ import annotations

import shlex

import pytest

from meshling.transparent.cli import run as cli_run
from meshling.transparent.rules import (
    CaptureError,
    CaptureSettings,
    capture_rules,
    chain_rules,
    install_document,
    parse_ports,
    removal_commands,
    uninstall_document,
)


def rules_of(chain: str, settings: CaptureSettings) -> list[str]:
    return [shlex.join(r[2:]) for r in chain_rules(settings) if r[1] == chain]


def test_rules_proxy_uid_returns_before_anything_is_redirected() -> None:
    out = rules_of("MESHLING_OUTPUT", CaptureSettings(proxy_uid=1337, dns_port=15053))
    assert out[0] == "-m owner --uid-owner 1337 -j RETURN"
    # DNS before the loopback exclusion: a resolver on 127.0.0.53 is captured too
    assert out[1:3] == [
        "-p udp --dport 53 -j REDIRECT --to-ports 15053",
        "-p tcp --dport 53 -j REDIRECT --to-ports 15053",
    ]
    assert out[3] == "-d 127.0.0.0/8 -j RETURN"
    assert out[-1] == "-p tcp -j MESHLING_REDIRECT"


def test_rules_outbound_redirects_to_the_outbound_port() -> None:
    settings = CaptureSettings(proxy_uid=0, outbound_port=15101)
    assert rules_of("MESHLING_REDIRECT", settings) == ["-p tcp -j REDIRECT --to-ports 15101"]


def test_rules_exclusions_return_in_the_output_chain() -> None:
    settings = CaptureSettings(
        proxy_uid=5,
        exclude_outbound_ports=(5432, 22),
        exclude_outbound_cidrs=("10.1.2.3", "192.168.0.0/16"),
        admin_port=9911,
    )
    out = rules_of("MESHLING_OUTPUT", settings)
    assert "-p tcp -m multiport --dports 9911,5432,22 -j RETURN" in out
    assert "-d 10.1.2.3/32 -j RETURN" in out
    assert "-d 192.168.0.0/16 -j RETURN" in out
    # every exclusion comes before the redirect
    assert out.index("-d 192.168.0.0/16 -j RETURN") < out.index("-p tcp -j MESHLING_REDIRECT")


def test_rules_inbound_excludes_the_proxy_ports_and_captures_all_by_default() -> None:
    settings = CaptureSettings(proxy_uid=5, exclude_inbound_ports=(22,), dns_port=15053)
    inbound = rules_of("MESHLING_INBOUND", settings)
    assert inbound == [
        "-p tcp -m multiport --dports 15006,15001,9901,15053,22 -j RETURN",
        "-p tcp -j MESHLING_IN_REDIRECT",
    ]
    assert rules_of("MESHLING_IN_REDIRECT", settings) == ["-p tcp -j REDIRECT --to-ports 15006"]


def test_rules_inbound_only_the_listed_ports() -> None:
    settings = CaptureSettings(
        proxy_uid=5, inbound_ports=(8080,), exclude_inbound_cidrs=("10.0.0.9",)
    )
    inbound = rules_of("MESHLING_INBOUND", settings)
    assert inbound[-2:] == [
        "-s 10.0.0.9/32 -j RETURN",
        "-p tcp --dport 8080 -j MESHLING_IN_REDIRECT",
    ]


def test_rules_many_ports_split_into_multiport_rules_of_fifteen() -> None:
    ports = tuple(range(20000, 20040))
    out = rules_of("MESHLING_OUTPUT", CaptureSettings(proxy_uid=1, exclude_outbound_ports=ports))
    multiport = [r for r in out if "--dports" in r]
    assert len(multiport) == 3  # 41 ports with the admin port: 15 + 15 + 11
    assert sum(len(r.split("--dports ")[1].split(" ")[0].split(",")) for r in multiport) == 41


def test_rules_without_inbound_capture_have_no_inbound_chains() -> None:
    document = capture_rules(CaptureSettings(proxy_uid=1, capture_inbound=False))
    assert "MESHLING_INBOUND" not in document
    assert "PREROUTING" not in document
    assert document.startswith("*nat\n:MESHLING_OUTPUT - [0:0]\n:MESHLING_REDIRECT - [0:0]\n")
    assert document.endswith("COMMIT\n")


def test_rules_jumps_come_last_and_dns_jump_only_when_asked() -> None:
    rules = [shlex.join(r) for r in chain_rules(CaptureSettings(proxy_uid=1))]
    assert rules[-2:] == [
        "-A OUTPUT -p tcp -j MESHLING_OUTPUT",
        "-A PREROUTING -p tcp -j MESHLING_INBOUND",
    ]
    with_dns = [shlex.join(r) for r in chain_rules(CaptureSettings(proxy_uid=1, dns_port=53535))]
    assert "-A OUTPUT -p udp --dport 53 -j MESHLING_OUTPUT" in with_dns


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"proxy_uid": -1}, "--proxy-user"),
        ({"proxy_uid": 1, "outbound_port": 0}, "--outbound-port"),
        ({"proxy_uid": 1, "exclude_outbound_cidrs": ("10.0.0.0/40",)}, "--exclude-outbound-cidrs"),
        ({"proxy_uid": 1, "exclude_inbound_cidrs": ("fd00::/8",)}, "IPv6"),
        ({"proxy_uid": 1, "inbound_port": 15001}, "--inbound-port 15001"),
        ({"proxy_uid": 1, "dns_port": 70000}, "--redirect-dns-port"),
    ],
)
def test_rules_bad_settings_name_the_option(settings: dict[str, object], message: str) -> None:
    with pytest.raises(CaptureError, match=message):
        CaptureSettings(**settings)  # type: ignore[arg-type]


def test_rules_parse_ports() -> None:
    assert parse_ports("80, 443,80,,", "--x") == (80, 443)
    assert parse_ports("", "--x") == ()
    with pytest.raises(CaptureError, match="--x: 'http' is not a port"):
        parse_ports("http", "--x")


INSTALLED = """\
-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-N DOCKER
-N MESHLING_INBOUND
-N MESHLING_IN_REDIRECT
-N MESHLING_OUTPUT
-N MESHLING_REDIRECT
-A PREROUTING -p tcp -j MESHLING_INBOUND
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -p tcp -j MESHLING_OUTPUT
-A OUTPUT -p udp -m udp --dport 53 -j MESHLING_OUTPUT
-A OUTPUT -d 10.1.1.1/32 -j ACCEPT
-A DOCKER -i docker0 -j RETURN
-A MESHLING_INBOUND -p tcp -j MESHLING_IN_REDIRECT
-A MESHLING_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A MESHLING_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESHLING_OUTPUT -p tcp -j MESHLING_REDIRECT
-A MESHLING_REDIRECT -p tcp -j REDIRECT --to-ports 15001
"""


def test_removal_deletes_only_meshling_jumps_and_chains() -> None:
    commands = [shlex.join(c) for c in removal_commands(INSTALLED)]
    assert commands == [
        "-D PREROUTING -p tcp -j MESHLING_INBOUND",
        "-D OUTPUT -p tcp -j MESHLING_OUTPUT",
        "-D OUTPUT -p udp -m udp --dport 53 -j MESHLING_OUTPUT",
        "-F MESHLING_INBOUND",
        "-F MESHLING_IN_REDIRECT",
        "-F MESHLING_OUTPUT",
        "-F MESHLING_REDIRECT",
        "-X MESHLING_INBOUND",
        "-X MESHLING_IN_REDIRECT",
        "-X MESHLING_OUTPUT",
        "-X MESHLING_REDIRECT",
    ]
    assert not any("DOCKER" in c or "10.1.1.1" in c for c in commands)


def test_removal_of_a_clean_table_is_nothing() -> None:
    clean = "\n".join(line for line in INSTALLED.splitlines() if "MESHLING" not in line)
    assert removal_commands(clean) == []
    assert uninstall_document(clean) is None


def test_install_over_an_install_deletes_the_old_jumps_in_one_transaction() -> None:
    settings = CaptureSettings(proxy_uid=1337, capture_inbound=False)
    document = install_document(settings, INSTALLED).splitlines()
    assert document[0] == "*nat" and document[-1] == "COMMIT"
    # the old jumps go, then the chains this install uses are declared (emptied) and
    # refilled, and the inbound chains it no longer uses are removed
    assert document.count("-D OUTPUT -p tcp -j MESHLING_OUTPUT") == 1
    assert document.count("-A OUTPUT -p tcp -j MESHLING_OUTPUT") == 1
    assert "-X MESHLING_INBOUND" in document
    assert "-X MESHLING_OUTPUT" not in document
    # on a clean table the document is the plain one
    assert install_document(settings, "") == capture_rules(settings)


def test_cli_dry_run_prints_the_rules_and_changes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    args = argparse.Namespace(
        transparent_command="install",
        proxy_user="4242",
        outbound_port=15001,
        inbound_port=15006,
        inbound_ports="8080",
        exclude_inbound_ports="",
        exclude_outbound_ports="",
        exclude_outbound_cidrs="",
        exclude_inbound_cidrs="",
        admin_port=9901,
        redirect_dns_port=None,
        dry_run=True,
        # a program that does not exist: a dry run must not need it
        iptables="meshling-no-such-iptables",
    )
    assert cli_run(args) == 0
    out = capsys.readouterr().out
    assert out == capture_rules(CaptureSettings(proxy_uid=4242, inbound_ports=(8080,)))


def test_cli_unknown_user_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from meshling.cli import main

    code = main(["transparent", "install", "--proxy-user", "no-such-user-here", "--dry-run"])
    assert code == 2
    assert "--proxy-user: no user 'no-such-user-here'" in capsys.readouterr().err
