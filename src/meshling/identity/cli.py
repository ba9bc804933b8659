"""`meshling ca ...`: a file-based mesh CA, for mTLS without a control plane.

    meshling ca init --mesh NAME --dir DIR [--validity 10y] [--force]
    meshling ca issue --dir DIR --service NAME --out OUTDIR [--ttl 24h]
    meshling ca show FILE

`issue` makes the service's key and CSR here and signs the CSR with the CA in DIR, the
same exchange a proxy and the control plane will have, and writes `<service>.crt`,
`<service>.key` (0600) and `bundle.crt` into OUTDIR, replacing what is there, since
running it again is how a certificate is renewed. Errors name the file and the reason,
and exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from meshling.identity import files
from meshling.identity.ca import (
    DEFAULT_LEAF_TTL,
    DEFAULT_ROOT_VALIDITY,
    CaError,
    CertificateAuthority,
    make_key_and_csr,
)
from meshling.identity.spiffe import SpiffeId, SpiffeIdError

EXIT_ERROR = 2
BUNDLE_FILE = "bundle.crt"

_UNITS = {
    "y": dt.timedelta(days=365),
    "w": dt.timedelta(weeks=1),
    "d": dt.timedelta(days=1),
    "h": dt.timedelta(hours=1),
    "m": dt.timedelta(minutes=1),
    "s": dt.timedelta(seconds=1),
}
_DURATION = re.compile(r"(?:\d+[ywdhms])+")
_DURATION_PART = re.compile(r"(\d+)([ywdhms])")


def parse_duration(text: str) -> dt.timedelta:
    """`10y`, `90d`, `24h`, `1h30m`, `45s` as a positive timedelta (a year is 365 days)."""
    if not _DURATION.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number and a unit (y, w, d, h, m, s), e.g. 24h"
        )
    total = sum(
        (int(count) * _UNITS[unit] for count, unit in _DURATION_PART.findall(text)),
        dt.timedelta(0),
    )
    if total <= dt.timedelta(0):
        raise argparse.ArgumentTypeError(f"duration {text!r} must be more than zero")
    return total


def _format_duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes = seconds // 60
    if days:
        return f"{days}d{hours}h"
    return f"{hours}h{minutes}m" if hours else f"{minutes}m"


def _timestamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class _Failure(Exception):
    """An error to print as `meshling ca: error: <message>` before exiting 2."""


def _init(args: argparse.Namespace) -> int:
    try:
        ca = CertificateAuthority.create(args.mesh, validity=args.validity)
    except SpiffeIdError as exc:
        raise _Failure(f"--mesh {args.mesh!r} is not a valid trust domain: {exc}") from None
    try:
        ca.save(args.dir, overwrite=args.force)
    except FileExistsError as exc:
        raise _Failure(
            f"{exc.filename}: a CA is already there; pass --force to replace it "
            "(every certificate it issued will stop being trusted)"
        ) from None
    directory = Path(args.dir)
    print(
        f"created the CA of mesh {ca.mesh!r} (root valid until {_timestamp(ca.root.not_valid_after_utc)}):"
    )
    print(f"  {directory / 'ca.crt'}")
    print(f"  {directory / 'ca.key'} (mode 0600: keep it secret)")
    return 0


def _issue(args: argparse.Namespace) -> int:
    try:
        ca = CertificateAuthority.load(args.dir)
    except files.IdentityFileError as exc:
        if exc.reason == files.NO_SUCH_FILE:
            raise _Failure(f"{exc}: no CA there? run `meshling ca init` first") from None
        raise
    try:
        identity = SpiffeId.for_service(ca.mesh, args.service)
    except SpiffeIdError as exc:
        raise _Failure(f"--service {args.service!r} is not a valid service name: {exc}") from None
    key_pem, csr_pem = make_key_and_csr(identity)
    now = dt.datetime.now(dt.UTC)
    try:
        cert_pem = ca.issue(csr_pem, args.service, ttl=args.ttl, now=now)
    except CaError as exc:
        raise _Failure(f"{Path(args.dir) / 'ca.crt'}: {exc.detail}") from None
    out = Path(args.out)
    out.mkdir(mode=0o755, parents=True, exist_ok=True)
    cert_path = out / f"{args.service}.crt"
    key_path = out / f"{args.service}.key"
    bundle_path = out / BUNDLE_FILE
    # Two files cannot change in one step: a reader between these writes gets a new key
    # with the old certificate, a pair that ssl's load_cert_chain refuses, so a reloader
    # keeps what it has and tries again.
    files.write_private_key(key_path, key_pem)
    files.write_certificates(cert_path, cert_pem)
    files.write_certificates(bundle_path, ca.bundle.to_pem())
    leaf = x509.load_pem_x509_certificate(cert_pem)
    # Certificate times have whole seconds: only a shortfall beyond that is a cut.
    cut = (
        " (cut to the root's end)"
        if leaf.not_valid_after_utc < now + args.ttl - dt.timedelta(seconds=1)
        else ""
    )
    print(f"issued {identity}, valid until {_timestamp(leaf.not_valid_after_utc)}{cut}:")
    print(f"  {cert_path}")
    print(f"  {key_path} (mode 0600)")
    print(f"  {bundle_path} (the roots to trust)")
    return 0


def _describe_identity(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        return f"none ({len(uris)} URI SANs, a SPIFFE certificate has exactly one)"
    try:
        return str(SpiffeId.parse(uris[0]))
    except SpiffeIdError as exc:
        return f"none ({exc})"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _show(args: argparse.Namespace) -> int:
    certs = files.read_certificates(args.file)
    now = dt.datetime.now(dt.UTC)
    for number, cert in enumerate(certs, 1):
        if now < cert.not_valid_before_utc:
            status = "not yet valid"
        elif now > cert.not_valid_after_utc:
            status = "EXPIRED"
        else:
            status = f"valid for {_format_duration(cert.not_valid_after_utc - now)}"
        print(f"{args.file} [{number}/{len(certs)}]")
        print(f"  SPIFFE ID   {_describe_identity(cert)}")
        print(f"  kind        {'CA' if _is_ca(cert) else 'leaf'}")
        print(f"  not before  {_timestamp(cert.not_valid_before_utc)}")
        print(f"  not after   {_timestamp(cert.not_valid_after_utc)} ({status})")
        print(f"  issuer      {cert.issuer.rfc4514_string() or '(empty)'}")
        print(f"  serial      {cert.serial_number:x}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshling ca",
        description="A file-based mesh CA: SPIFFE certificates for mTLS between proxies.",
    )
    commands = parser.add_subparsers(dest="ca_command", required=True)

    init = commands.add_parser("init", help="create a mesh's root certificate and key")
    init.add_argument("--mesh", required=True, help="the mesh name, i.e. the trust domain")
    init.add_argument("--dir", required=True, help="where to write ca.crt and ca.key")
    init.add_argument(
        "--validity",
        type=parse_duration,
        default=DEFAULT_ROOT_VALIDITY,
        help="how long the root is valid (default 10y)",
    )
    init.add_argument("--force", action="store_true", help="replace a CA already in --dir")
    init.set_defaults(func=_init)

    issue = commands.add_parser("issue", help="make a key and certificate for a service")
    issue.add_argument("--dir", required=True, help="the CA's directory (from `ca init`)")
    issue.add_argument("--service", required=True, help="the service name")
    issue.add_argument("--out", required=True, help="where to write the files")
    issue.add_argument(
        "--ttl",
        type=parse_duration,
        default=DEFAULT_LEAF_TTL,
        help="how long the certificate is valid (default 24h)",
    )
    issue.set_defaults(func=_issue)

    show = commands.add_parser("show", help="print what a certificate file holds")
    show.add_argument("file", help="a PEM file of one or more certificates")
    show.set_defaults(func=_show)
    return parser


def run(args: Sequence[str]) -> int:
    """Run `meshling ca <args>`; the exit status (0, or 2 for any error)."""
    parser = build_parser()
    try:
        namespace = parser.parse_args(list(args))
    except SystemExit as exc:
        # argparse exits on --help (0) and on usage errors (2); callers want a status
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        return int(namespace.func(namespace))
    except (_Failure, files.IdentityFileError) as exc:
        print(f"meshling ca: error: {exc}", file=sys.stderr)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"meshling ca: error: {where}{exc.strerror or exc}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
