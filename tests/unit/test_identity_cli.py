"""`meshling ca` in-process: durations, exit statuses, and error messages that name the file."""

from __future__ import annotations

import argparse
import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshling.identity import Bundle, SpiffeId, verify_svid
from meshling.identity.cli import parse_duration, run


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", dt.timedelta(hours=24)),
        ("10y", dt.timedelta(days=3650)),
        ("2w", dt.timedelta(days=14)),
        ("90d", dt.timedelta(days=90)),
        ("1h30m", dt.timedelta(minutes=90)),
        ("45s", dt.timedelta(seconds=45)),
    ],
)
def test_cli_parse_duration_reads_units(text: str, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "24", "h", "1.5h", "-1h", "0s", "1 h", "1H", "1h 30m"])
def test_cli_parse_duration_refuses_bad_input(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_cli_help_and_usage_errors_return_a_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == 0
    assert run([]) == 2
    assert run(["init", "--mesh", "m"]) == 2
    assert run(["rotate"]) == 2
    assert "usage: meshling ca" in capsys.readouterr().err


def test_cli_init_writes_the_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["init", "--mesh", "prod", "--dir", str(tmp_path / "ca"), "--validity", "1y"]) == 0
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    root = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=365, minutes=2)
    assert "prod" in capsys.readouterr().out


def test_cli_init_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["init", "--mesh", "prod", "--dir", str(tmp_path)]) == 0
    before = (tmp_path / "ca.crt").read_bytes()
    capsys.readouterr()
    assert run(["init", "--mesh", "prod", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "ca.crt") in err
    assert "--force" in err
    assert (tmp_path / "ca.crt").read_bytes() == before
    assert run(["init", "--mesh", "prod", "--dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() != before


def test_cli_init_refuses_a_bad_mesh_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["init", "--mesh", "Prod", "--dir", str(tmp_path)]) == 2
    assert "--mesh 'Prod'" in capsys.readouterr().err
    assert not (tmp_path / "ca.key").exists()


def test_cli_issue_writes_key_certificate_and_bundle(tmp_path: Path) -> None:
    assert run(["init", "--mesh", "prod", "--dir", str(tmp_path / "ca")]) == 0
    out = tmp_path / "out"
    args = ["issue", "--dir", str(tmp_path / "ca"), "--service", "web", "--out", str(out)]
    assert run([*args, "--ttl", "2h"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["bundle.crt", "web.crt", "web.key"]
    assert stat.S_IMODE((out / "web.key").stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificate((out / "web.crt").read_bytes())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=2, minutes=1)
    bundle = Bundle.from_pem((out / "bundle.crt").read_bytes())
    now = dt.datetime.now(dt.UTC)
    assert verify_svid([leaf.public_bytes(Encoding.DER)], bundle, now=now) == SpiffeId(
        "prod", "/web"
    )
    # running it again renews: a new key and certificate replace the old ones
    old_key = (out / "web.key").read_bytes()
    assert run(args) == 0
    assert (out / "web.key").read_bytes() != old_key


def test_cli_issue_without_a_ca_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["issue", "--dir", str(tmp_path), "--service", "web", "--out", str(tmp_path / "out")]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "ca.crt") in err
    assert "meshling ca init" in err
    assert not (tmp_path / "out").exists()


def test_cli_issue_refuses_a_bad_service_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["init", "--mesh", "prod", "--dir", str(tmp_path)]) == 0
    args = ["issue", "--dir", str(tmp_path), "--service", "a/b", "--out", str(tmp_path / "out")]
    assert run(args) == 2
    assert "--service 'a/b'" in capsys.readouterr().err


def test_cli_issue_with_a_mismatched_key_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["init", "--mesh", "prod", "--dir", str(tmp_path / "a")]) == 0
    assert run(["init", "--mesh", "prod", "--dir", str(tmp_path / "b")]) == 0
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())
    capsys.readouterr()
    args = ["issue", "--dir", str(tmp_path / "a"), "--service", "web", "--out", str(tmp_path)]
    assert run(args) == 2
    assert f"{tmp_path / 'a' / 'ca.key'}: " in capsys.readouterr().err


def test_cli_show_prints_identity_validity_issuer_serial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["init", "--mesh", "prod", "--dir", str(tmp_path)]) == 0
    assert run(["issue", "--dir", str(tmp_path), "--service", "api", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert run(["show", str(tmp_path / "api.crt")]) == 0
    out = capsys.readouterr().out
    leaf = x509.load_pem_x509_certificate((tmp_path / "api.crt").read_bytes())
    assert "SPIFFE ID   spiffe://prod/api" in out
    assert "kind        leaf" in out
    assert f"serial      {leaf.serial_number:x}" in out
    assert leaf.issuer.rfc4514_string() in out
    assert leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") in out
    assert run(["show", str(tmp_path / "bundle.crt")]) == 0
    out = capsys.readouterr().out
    assert "SPIFFE ID   spiffe://prod\n" in out
    assert "kind        CA" in out


def test_cli_show_refuses_a_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["init", "--mesh", "prod", "--dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert run(["show", str(tmp_path / "ca.key")]) == 2
    assert f"{tmp_path / 'ca.key'}: no PEM certificate" in capsys.readouterr().err


def test_cli_issue_says_when_the_root_cuts_the_ttl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["init", "--mesh", "prod", "--dir", str(tmp_path), "--validity", "1h"]) == 0
    root = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    assert run(["issue", "--dir", str(tmp_path), "--service", "web", "--out", str(tmp_path)]) == 0
    assert "(cut to the root's end)" in capsys.readouterr().out
    leaf = x509.load_pem_x509_certificate((tmp_path / "web.crt").read_bytes())
    assert leaf.not_valid_after_utc == root.not_valid_after_utc


def test_cli_issue_does_not_claim_a_cut_for_a_normal_ttl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["init", "--mesh", "prod", "--dir", str(tmp_path)]) == 0
    assert run(["issue", "--dir", str(tmp_path), "--service", "web", "--out", str(tmp_path)]) == 0
    assert "cut to the root" not in capsys.readouterr().out
