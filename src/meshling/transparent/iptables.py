"""Running the capture rules: `iptables -S` to read, `iptables-restore --noflush` to write.

The documents come from `rules`; this module only runs the two programs, each change in
one restore transaction, so a failed install leaves the table as it was.
"""

from __future__ import annotations

import shutil
import subprocess

from meshling.transparent.rules import CaptureSettings, install_document, uninstall_document


class IptablesError(RuntimeError):
    """iptables is missing or refused a change; the message carries its own words."""


def _run(argv: list[str], stdin: str | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise IptablesError(f"{argv[0]} is not installed (Debian package: iptables)")
    result = subprocess.run(
        ["/usr/bin/env", *argv] if "/" not in argv[0] else argv,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise IptablesError(f"{' '.join(argv)}: {result.stderr.strip() or 'failed'}")
    return result.stdout


def listing(iptables: str = "iptables") -> str:
    """The nat table as `iptables -t nat -S` prints it."""
    return _run([iptables, "-w", "-t", "nat", "-S"])


def install(settings: CaptureSettings, iptables: str = "iptables") -> str:
    """Install (or replace) the capture rules; the document applied."""
    document = install_document(settings, listing(iptables))
    _run([f"{iptables}-restore", "-w", "--noflush"], document)
    return document


def uninstall(iptables: str = "iptables") -> str | None:
    """Remove every meshling rule and chain; the document applied, None if none were."""
    document = uninstall_document(listing(iptables))
    if document is not None:
        _run([f"{iptables}-restore", "-w", "--noflush"], document)
    return document
