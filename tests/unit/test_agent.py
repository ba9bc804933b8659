"""The proxy's control-plane client: its decisions (backoff, failover, renewal time), its
data directory, and its start-up inputs."""

from __future__ import annotations

import datetime as dt
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshling.agent.agent import stream_url
from meshling.agent.backoff import Addresses, Backoff
from meshling.agent.datadir import DataDir, DataDirError
from meshling.agent.renewal import CertificateTimes
from meshling.agent.settings import SettingsError, parse_addresses, read_dataplane, read_token
from meshling.identity import CertificateAuthority, SpiffeId, make_key_and_csr
from meshling.snapshot import SnapshotError


def fixed(values: list[float]) -> Iterator[float]:
    yield from values


# -- backoff --------------------------------------------------------------------------
def test_backoff_bound_doubles_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 30.0, random=lambda: 1.0)
    delays = [backoff.failure() for _ in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_backoff_full_jitter_draws_between_zero_and_the_bound() -> None:
    draws = fixed([0.0, 0.5, 0.25])
    backoff = Backoff(1.0, 30.0, random=lambda: next(draws))
    assert [backoff.failure() for _ in range(3)] == [0.0, 1.0, 1.0]


def test_backoff_success_starts_over() -> None:
    backoff = Backoff(0.5, 30.0, random=lambda: 1.0)
    for _ in range(5):
        backoff.failure()
    backoff.success()
    assert backoff.failure() == 0.5


def test_backoff_survives_a_very_long_outage() -> None:
    backoff = Backoff(0.5, 30.0, random=lambda: 1.0)
    backoff.attempts = 10_000
    assert backoff.failure() == 30.0


def test_backoff_refusal_waits_long_whatever_the_count() -> None:
    backoff = Backoff(0.5, 30.0, refused=300.0, random=lambda: 0.0)
    assert backoff.refusal() == 150.0
    backoff = Backoff(0.5, 30.0, refused=300.0, random=lambda: 1.0)
    assert backoff.refusal() == 300.0


def test_backoff_rejects_a_bad_schedule() -> None:
    with pytest.raises(ValueError):
        Backoff(0.0, 30.0)
    with pytest.raises(ValueError):
        Backoff(60.0, 30.0)


def test_addresses_fail_over_in_turn() -> None:
    addresses = Addresses(["http://a", "http://b", "http://c"])
    assert addresses.current == "http://a"
    assert [addresses.failed() for _ in range(4)] == [
        "http://b",
        "http://c",
        "http://a",
        "http://b",
    ]


def test_addresses_need_one() -> None:
    with pytest.raises(ValueError):
        Addresses([])


# -- renewal --------------------------------------------------------------------------
def test_renewal_at_half_life_from_not_before() -> None:
    times = CertificateTimes(1000.0, 2000.0)
    assert times.renew_at() == 1500.0
    assert times.renewal_delay(1200.0) == 300.0
    assert times.renewal_delay(1600.0) == 0.0


def test_renewal_counts_life_from_when_it_was_obtained() -> None:
    # a CA back-dates notBefore by a minute; a 10 s certificate must not look spent
    times = CertificateTimes(940.0, 1010.0, obtained=1000.0)
    assert times.renew_at() == 1005.0
    assert times.renewal_delay(1000.0) == 5.0


def test_renewal_obtained_before_not_before_counts_from_not_before() -> None:
    assert CertificateTimes(1000.0, 2000.0, obtained=500.0).renew_at() == 1500.0


def test_renewal_obtained_after_expiry_is_due_at_once() -> None:
    times = CertificateTimes(1000.0, 2000.0, obtained=3000.0)
    assert times.renewal_delay(3000.0) == 0.0


def test_renewal_usable_only_within_validity() -> None:
    times = CertificateTimes(1000.0, 2000.0)
    assert not times.usable(999.0)
    assert times.usable(1000.0)
    assert times.usable(1999.0)
    assert not times.usable(2000.0)


def test_renewal_times_from_a_real_certificate() -> None:
    ca = CertificateAuthority.create("default")
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    _, csr = make_key_and_csr(SpiffeId.for_service("default", "api"))
    cert = ca.issue(csr, "api", ttl=dt.timedelta(hours=24), now=now)
    times = CertificateTimes.from_pem(cert, obtained=now.timestamp())
    assert times.not_after == now.timestamp() + 86400
    assert times.renew_at() == now.timestamp() + 43200


# -- data directory -------------------------------------------------------------------
def test_datadir_is_made_0700_and_files_0600(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "a" / "proxy")
    data.prepare()
    assert stat.S_IMODE(data.path.stat().st_mode) == 0o700
    data.save_snapshot("v1", {"version": "v1"})
    assert stat.S_IMODE(Path(data.snapshot).stat().st_mode) == 0o600
    assert not list(data.path.glob(".*.tmp"))


def test_datadir_narrows_an_open_directory(tmp_path: Path) -> None:
    d = tmp_path / "proxy"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    DataDir(d).prepare()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_datadir_unusable_path_names_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataDirError, match="file"):
        DataDir(tmp_path / "file" / "proxy").prepare()


def test_datadir_snapshot_round_trip_and_garbage(tmp_path: Path) -> None:
    data = DataDir(tmp_path)
    assert data.load_snapshot() is None
    data.save_snapshot("v7", {"version": "v7", "listeners": []})
    cached = data.load_snapshot()
    assert cached is not None and cached.version == "v7"
    assert cached.document == {"version": "v7", "listeners": []}
    Path(data.snapshot).write_text("{not json")
    assert data.load_snapshot() is None
    Path(data.snapshot).write_text(json.dumps([1, 2]))
    assert data.load_snapshot() is None


def _credentials(ca: CertificateAuthority) -> tuple[bytes, bytes]:
    key, csr = make_key_and_csr(SpiffeId.for_service("default", "api"))
    return ca.issue(csr, "api"), key


def test_datadir_credentials_round_trip(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("default")
    cert, key = _credentials(ca)
    data = DataDir(tmp_path)
    assert data.load_credentials() is None
    data.save_credentials(cert, key, ca.root_pem)
    for path in (data.certificate, data.key, data.trust_bundle):
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    loaded = data.load_credentials()
    assert loaded is not None
    assert (loaded.certificate, loaded.key, loaded.bundle) == (cert, key, ca.root_pem)
    assert loaded.times.obtained is not None


def test_datadir_rejects_a_key_of_another_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("default")
    cert, _ = _credentials(ca)
    _, other_key = _credentials(ca)
    data = DataDir(tmp_path)
    data.save_credentials(cert, other_key, ca.root_pem)
    assert data.load_credentials() is None


# -- settings -------------------------------------------------------------------------
def test_settings_addresses() -> None:
    assert parse_addresses("http://a:5681/, https://b:5682") == ("http://a:5681", "https://b:5682")
    for bad in ("", " , ", "a:5681", "ftp://a", "http://a:port"):
        with pytest.raises(SettingsError, match="--cp"):
            parse_addresses(bad)


def test_settings_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    with pytest.raises(SettingsError, match=r"does not exist.*meshling token dataplane"):
        read_token(str(path))
    path.write_text("")
    with pytest.raises(SettingsError, match="one token"):
        read_token(str(path))
    path.write_text("abc.def\n")
    assert read_token(str(path)) == "abc.def"


def test_settings_dataplane_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "dp.yaml"
    with pytest.raises(SnapshotError, match="cannot read file"):
        read_dataplane(str(path))
    path.write_text(
        "kind: Dataplane\nmetadata: {name: api-1, mesh: default}\n"
        "spec: {service: api, address: 127.0.0.1, inbounds: [{port: 0, service_port: 80}]}\n"
    )
    with pytest.raises(SnapshotError) as error:
        read_dataplane(str(path))
    assert error.value.path.startswith("spec.inbounds[0].port")


def test_settings_dataplane_valid(tmp_path: Path) -> None:
    path = tmp_path / "dp.yaml"
    path.write_text(
        "kind: Dataplane\nmetadata: {name: api-1, mesh: default}\n"
        "spec: {service: api, address: 127.0.0.1, inbounds: [{port: 15006, service_port: 80}]}\n"
    )
    document, dataplane = read_dataplane(str(path))
    assert document["metadata"]["name"] == "api-1"
    assert (dataplane.name, dataplane.service, dataplane.mesh) == ("api-1", "api", "default")


def test_stream_url() -> None:
    assert stream_url("http://cp:5681") == "ws://cp:5681/api/v1/stream"
    assert stream_url("https://cp/prefix/") == "wss://cp/prefix/api/v1/stream"
