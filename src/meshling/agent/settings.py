"""What a proxy in control-plane mode starts from, checked before anything is bound.

* the control-plane addresses, `http(s)://HOST:PORT`, tried in turn;
* the dataplane token file (a bearer token from `meshling token dataplane`); it is read
  again before every connection, so a replaced token takes effect without a restart;
* the Dataplane document (YAML or JSON), validated as the control plane will validate it;
* the data directory (see `datadir`);
* for `https://` addresses, the CA file that vouches for the control plane's server
  certificate when it is not signed by a CA the system trusts.

Every error names the file or option, the field and what to do.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from meshling.snapshot.load import SnapshotError, parse_text

DEFAULT_DATA_DIR = "meshling-proxy"


class SettingsError(Exception):
    """A start-up input that cannot be used; the text says which and why."""


@dataclass(frozen=True, slots=True)
class AgentSettings:
    control_planes: tuple[str, ...]
    token_file: str
    dataplane_file: str
    data_dir: str = DEFAULT_DATA_DIR
    # PEM CA certificates for the control plane's https:// server; None: the system's
    cp_ca_file: str | None = None


def client_tls(cp_ca_file: str | None) -> ssl.SSLContext:
    """The TLS client context for `https://` control planes: hostname and chain checked,
    against `cp_ca_file` when given, else the system's trusted CAs."""
    try:
        return ssl.create_default_context(cafile=cp_ca_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SettingsError(f"--cp-ca-file: cannot load {cp_ca_file}: {reason}") from None


def parse_addresses(text: str) -> tuple[str, ...]:
    """`URL[,URL...]` as a tuple of base URLs without a trailing slash."""
    urls = []
    for raw in text.split(","):
        url = raw.strip().rstrip("/")
        if not url:
            continue
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(
                f"--cp: {raw.strip()!r} is not a control-plane address: "
                "expected http://HOST:PORT or https://HOST:PORT"
            )
        try:
            parts.port  # noqa: B018 - raises for a port that is not a number
        except ValueError:
            raise SettingsError(f"--cp: {raw.strip()!r} has an invalid port") from None
        urls.append(url)
    if not urls:
        raise SettingsError("--cp: no control-plane address given")
    return tuple(urls)


def read_token(path: str) -> str:
    """The dataplane token in `path` (surrounding whitespace removed)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except FileNotFoundError:
        raise SettingsError(
            f"--token-file: {path} does not exist; "
            "get a token with `meshling token dataplane` and write it there"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SettingsError(f"--token-file: cannot read {path}: {reason}") from None
    if not token or any(c.isspace() for c in token):
        raise SettingsError(f"--token-file: {path} must hold one token, on one line")
    return token


def read_dataplane(path: str) -> tuple[dict[str, Any], Any]:
    """The Dataplane document in `path` and the resource it describes.

    Raises SnapshotError (file, field path, reason) for an invalid document.
    """
    from meshling.controlplane.resources import parse_dataplane

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise SnapshotError(path, "", f"cannot read file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SnapshotError(path, "", "file is not UTF-8 text") from None
    document = parse_text(text, path)
    dataplane = parse_dataplane(document, path)
    return document, dataplane
