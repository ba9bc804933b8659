"""`meshling apply`, `get`, `delete`, `token` and `inspect`: the control plane through its API.

    meshling apply -f FILE|DIR|- [--allow-unmatched]
                                            create or update every document, in order
    meshling get KIND [NAME] [--mesh M] [-l k=v,...] [-o table|yaml|json]
    meshling delete KIND NAME [--mesh M]
    meshling token dataplane --service S [--mesh M] [--ttl 24h] [-o FILE]
    meshling token revoke JTI [--mesh M]
    meshling inspect dataplane NAME [--mesh M] [-o text|yaml|json]
    meshling stat [SERVICE] [--mesh M] [--window 60s] [--by service|route] [-o table|json]
    meshling tap SERVICE [--mesh M] [--direction D] [--method M] [--path P] [--status S]
                 [--sample PCT] [--max N] [--duration 30s] [-o text|json]
    meshling explain SOURCE DESTINATION [--mesh M] [--dataplane N] [--method M] [--path P]
                 [--header k=v ...] [--port P] [-o text|json]

Where the control plane is, and the admin token, come from flags, then the environment,
then a config file, then defaults:

    --cp URL          MESHLING_CP                 cp:          default http://127.0.0.1:5681
    --token T         MESHLING_ADMIN_TOKEN        token:
    --token-file F    MESHLING_ADMIN_TOKEN_FILE   token_file:  default ./meshling-admin.token or
                                                               ./meshling-cp/admin.token (where
                                                               `control-plane run` writes it)
    --cp-ca-file F    MESHLING_CP_CA_FILE         ca_file:     CA certificates for https://

The config file is `--config F`, else `$MESHLING_CLI_CONFIG`, else
`$XDG_CONFIG_HOME/meshling/config.yaml` (`~/.config/meshling/config.yaml`) when it exists:
a YAML mapping of the keys above. A token given in the environment or the config file
wins over any file named in a later place, as a flag does.

`apply` checks every document before it sends any, so a set with one bad document
changes nothing: the YAML, each document with the control plane's own rules, then against
what is stored: a policy must select a registered dataplane (or one applied before it in
the same set; `--allow-unmatched` stores it anyway, for policies applied before their
workloads register), and a document that carries `metadata.version` (it was read with
`get -o yaml` and edited) must still be at that version. Exit status: 0 done, 1 refused (an invalid
document, an unknown resource, a refusal of the API), 2 usage errors and an unreachable
control plane.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml

from meshling.controlplane.client import (
    ApiError,
    Client,
    Unreachable,
    given_version,
    identity,
    without_read_only,
)
from meshling.controlplane.resources import (
    DATAPLANE_KIND,
    MESH_KIND,
    Dataplane,
    kinds,
    parse_dataplane,
    parse_resource,
)
from meshling.controlplane.resources.metadata import parse_selector as read_selector
from meshling.policies import policy_type
from meshling.snapshot.load import SnapshotError

DEFAULT_CP = "http://127.0.0.1:5681"
DEFAULT_TOKEN_FILE = "meshling-admin.token"
# where `meshling control-plane run` writes it, with its default --data-dir
CP_TOKEN_FILE = os.path.join("meshling-cp", "admin.token")
APPLY_SUFFIXES = (".yaml", ".yml", ".json")

T = TypeVar("T")


class CliError(Exception):
    """A failure the user can act on: the message, and the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Document:
    """One resource document of an applied file: where it came from, and its content."""

    source: str
    index: int  # 1-based, among the documents of its file
    content: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.source} (document {self.index})"


def run(args: list[str]) -> int:
    parser = build_parser()
    try:
        options = parser.parse_args(args)
    except SystemExit as e:  # --help, or a usage error argparse has printed
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(options.func(options))
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cp",
        help=f"the control plane's API URL (env MESHLING_CP, config `cp:`, default {DEFAULT_CP})",
    )
    common.add_argument(
        "--token", help="the admin token (env MESHLING_ADMIN_TOKEN, config `token:`)"
    )
    common.add_argument(
        "--token-file",
        help="a file holding the admin token (env MESHLING_ADMIN_TOKEN_FILE, config "
        f"`token_file:`, default ./{DEFAULT_TOKEN_FILE} or ./{CP_TOKEN_FILE} when one exists)",
    )
    common.add_argument(
        "--cp-ca-file",
        help="CA certificates (PEM) for an https:// control plane whose certificate no "
        "system CA vouches for (env MESHLING_CP_CA_FILE, config `ca_file:`)",
    )
    common.add_argument(
        "--config",
        help="the CLI's config file (env MESHLING_CLI_CONFIG, default "
        "~/.config/meshling/config.yaml when it exists)",
    )

    parser = argparse.ArgumentParser(prog="meshling", description="Manage mesh resources.")
    commands = parser.add_subparsers(dest="command", required=True)

    apply = commands.add_parser(
        "apply",
        parents=[common],
        help="create or update resources from files",
        description="Create or update the resources of multi-document YAML/JSON files. "
        "Every document is validated before any is sent.",
    )
    apply.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE|DIR|-",
        help="a file, a directory (its *.yaml, *.yml and *.json files, sorted), or - "
        "for standard input; may be repeated",
    )
    apply.add_argument(
        "--allow-unmatched",
        action="store_true",
        help="store policies that select no registered dataplane (yet), as when policies "
        "are applied before their workloads register",
    )
    apply.set_defaults(func=_apply)

    get = commands.add_parser(
        "get", parents=[common], help="show resources", description="Show resources."
    )
    get.add_argument("kind", help=f"a resource kind ({', '.join(kinds())})")
    get.add_argument("name", nargs="?", help="one resource; all of the kind when left out")
    get.add_argument(
        "--mesh", "-m", help="the mesh (default: all meshes for a list, 'default' by name)"
    )
    get.add_argument(
        "-l", "--selector", default="", help="only resources with these labels: k=v[,k=v...]"
    )
    get.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    get.set_defaults(func=_get)

    delete = commands.add_parser(
        "delete", parents=[common], help="remove a resource", description="Remove a resource."
    )
    delete.add_argument("kind", help=f"a resource kind ({', '.join(kinds())})")
    delete.add_argument("name")
    delete.add_argument("--mesh", "-m", default="default", help="the mesh (default: default)")
    delete.set_defaults(func=_delete)

    token = commands.add_parser(
        "token",
        parents=[common],
        help="issue or revoke dataplane tokens",
        description="Dataplane tokens: what a proxy shows the control plane to get its "
        "certificate and its config stream; bound to one mesh and service.",
    )
    token_commands = token.add_subparsers(dest="token_command", required=True)
    issue = token_commands.add_parser(
        "dataplane", parents=[common], help="issue a token for a service's proxies"
    )
    issue.add_argument("--service", required=True, help="the service the proxies stand for")
    issue.add_argument("--mesh", "-m", default="default", help="the mesh (default: default)")
    issue.add_argument("--ttl", default="24h", help="lifetime: 30m, 24h, 7d (default 24h)")
    issue.add_argument(
        "-o", "--output", metavar="FILE", help="write the token to FILE (0600) instead of stdout"
    )
    issue.set_defaults(func=_token_dataplane)
    revoke = token_commands.add_parser(
        "revoke", parents=[common], help="revoke a token by its id (jti)"
    )
    revoke.add_argument("jti", help="the token id, as `token dataplane` printed it")
    revoke.add_argument("--mesh", "-m", default="default", help="the token's mesh")
    revoke.set_defaults(func=_token_revoke)

    inspect = commands.add_parser(
        "inspect",
        parents=[common],
        help="show what the control plane knows of a proxy",
        description="A dataplane's stream (online, last seen, pushed and applied snapshot "
        "versions, last NACK), its certificate's expiry, and its current snapshot.",
    )
    inspect.add_argument("what", choices=["dataplane"], help="what to inspect")
    inspect.add_argument("name", help="the dataplane's name")
    inspect.add_argument("--mesh", "-m", default="default", help="the mesh (default: default)")
    inspect.add_argument("-o", "--output", choices=["text", "yaml", "json"], default="text")
    inspect.set_defaults(func=_inspect)

    check = commands.add_parser(
        "check",
        parents=[common],
        help="check the mesh: control plane, proxies, certificates",
        description="Is the control plane up and does it take the token; is every "
        "dataplane's proxy connected and running the snapshot last pushed to it; does a "
        "proxy certificate expire soon? Exits 0 when every check passes, 1 otherwise "
        "(2 when the control plane cannot be reached).",
    )
    check.add_argument("--mesh", "-m", default=None, help="only this mesh (default: all)")
    check.add_argument(
        "--expiry-warning",
        default="6h",
        help="fail for a certificate that expires within this (default 6h: proxies renew "
        "theirs at half-life, so a 24h one has 12h or more left; 30m, 7d...)",
    )
    check.set_defaults(func=_check)

    explain = commands.add_parser(
        "explain",
        parents=[common],
        help="why a request takes its route, is let in or not, and which policies apply",
        description="Explain a request from SOURCE (a service, or a dataplane's name) to "
        "the service DESTINATION: the route its outbound takes (HTTPRoute rule or default, "
        "backends, the rules tried before and why they did not match), the "
        "TrafficPermission rule that admits or denies it, and every policy on the way, "
        "with the ones a more specific policy shadows. Computed by the control plane from "
        "the same code that builds the proxies' snapshots. Exits 0 when the request would "
        "be allowed, 1 when it would be denied or has no route, 2 on bad input or an "
        "unreachable control plane.",
    )
    explain.add_argument("source", help="the calling service, or one dataplane's name")
    explain.add_argument("destination", help="the called service")
    explain.add_argument("--mesh", "-m", default="default", help="the mesh (default: default)")
    explain.add_argument("--dataplane", help="only this dataplane of the source service")
    explain.add_argument("--method", default="GET", help="the request's method (default GET)")
    explain.add_argument("--path", default="/", help="the request's path and query (default /)")
    explain.add_argument(
        "--header",
        "-H",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a request header; may be repeated",
    )
    explain.add_argument("--port", type=int, help="the destination's inbound port")
    explain.add_argument("-o", "--output", choices=["text", "json"], default="text")
    explain.set_defaults(func=_explain)

    stat = commands.add_parser(
        "stat",
        parents=[common],
        help="golden metrics of services: success rate, requests a second, latency",
        description="Success rate, requests a second and latency percentiles of each "
        "service (or route) over a window, from the counters the proxies send their "
        "control plane (the server side: each service's inbound requests).",
    )
    stat.add_argument("service", nargs="?", help="only this service")
    stat.add_argument("--mesh", "-m", default="default", help="the mesh (default: default)")
    stat.add_argument("--window", "-w", default="60s", help="30s, 5m... (default 60s, max 15m)")
    stat.add_argument("--by", choices=["service", "route"], default="service")
    stat.add_argument("-o", "--output", choices=["table", "json"], default="table")
    stat.set_defaults(func=_stat)

    tap = commands.add_parser(
        "tap",
        parents=[common],
        help="watch a service's requests live",
        description="Print the requests to SERVICE as they end, one line each: inbound "
        "ones from its own proxies, outbound ones from the proxies calling it. Ends after "
        "--duration or --max requests, or on Ctrl-C.",
    )
    tap.add_argument("service", help="the service to watch")
    tap.add_argument("--mesh", "-m", default="default", help="the mesh (default: default)")
    tap.add_argument("--direction", choices=["inbound", "outbound"], help="default: both")
    tap.add_argument("--method", help="only this method (GET, POST...)")
    tap.add_argument("--path", help="only paths with this prefix")
    tap.add_argument("--status", help="only this status class (5xx) or code (503)")
    tap.add_argument("--sample", type=float, default=100.0, help="percent of requests (100)")
    tap.add_argument("--max", type=int, default=100, help="stop after N requests (100)")
    tap.add_argument("--duration", default="30s", help="stop after this long (30s)")
    tap.add_argument("-o", "--output", choices=["text", "json"], default="text")
    tap.set_defaults(func=_tap)
    return parser


# commands


def _apply(options: argparse.Namespace) -> int:
    documents: list[Document] = []
    for target in options.filename:
        documents.extend(read_documents(target))
    invalid = [problem for problem in map(check, documents) if problem]
    if invalid:
        for problem in invalid:
            print(problem, file=sys.stderr)
        print(
            f"error: {len(invalid)} of {len(documents)} documents are invalid; nothing applied",
            file=sys.stderr,
        )
        return 1
    if not documents:
        raise CliError(f"no resource documents in {', '.join(options.filename)}")
    client = connect(options)
    refused = preflight(client, documents, allow_unmatched=options.allow_unmatched)
    if refused:
        for problem in refused:
            print(problem, file=sys.stderr)
        print(
            f"error: {len(refused)} of {len(documents)} documents would be refused; "
            "nothing applied",
            file=sys.stderr,
        )
        return 1
    for done, document in enumerate(documents):
        apply = functools.partial(
            client.apply, document.content, allow_unmatched=options.allow_unmatched
        )
        try:
            action, _ = call(client, apply)
        except ApiError as e:
            print(f"{document.where}: {refusal(e, document)}", file=sys.stderr)
            if done:
                print(
                    f"error: the {done} documents before it were applied, the rest were not",
                    file=sys.stderr,
                )
            return 1
        print(f"{address(*identity(document.content))} {action}", flush=True)
    return 0


def _get(options: argparse.Namespace) -> int:
    kind = canonical_kind(options.kind)
    selector = parse_selector(options.selector)
    client = connect(options)
    if options.name is not None:
        mesh = options.name if kind == MESH_KIND else (options.mesh or "default")
        try:
            resource = call(client, lambda: client.read(kind, mesh, options.name))
        except ApiError as e:
            raise CliError(_not_found(e, kind, mesh, options.name)) from None
        resources = [resource]
    else:
        try:
            resources = call(client, lambda: client.list_resources(kind, options.mesh, selector))
        except ApiError as e:
            raise CliError(str(e)) from None
    if options.output == "json":
        value: Any = (
            resources[0]
            if options.name is not None
            else {
                "kind": kind,
                "items": resources,
            }
        )
        print(json.dumps(value, indent=2))
    elif options.output == "yaml":
        print(yaml.safe_dump_all(resources, sort_keys=False), end="")
    elif resources:
        statuses = dataplane_statuses(client, options.mesh) if kind == DATAPLANE_KIND else None
        print(table(kind, resources, statuses=statuses), end="")
    else:
        where = f" in mesh {options.mesh}" if options.mesh else ""
        print(f"no {kind} resources found{where}", file=sys.stderr)
    return 0


def _delete(options: argparse.Namespace) -> int:
    kind = canonical_kind(options.kind)
    mesh = options.name if kind == MESH_KIND else options.mesh
    client = connect(options)
    try:
        call(client, lambda: client.delete(kind, mesh, options.name))
    except ApiError as e:
        raise CliError(_not_found(e, kind, mesh, options.name)) from None
    print(f"{address(kind, mesh, options.name)} deleted")
    return 0


def _token_dataplane(options: argparse.Namespace) -> int:
    client = connect(options)
    try:
        issued = call(
            client, lambda: client.issue_token(options.mesh, options.service, options.ttl)
        )
    except ApiError as e:
        raise CliError(str(e)) from None
    token = str(issued["token"])
    what = (
        f"token for spiffe://{issued.get('mesh')}/{issued.get('service')} "
        f"(id {issued.get('jti')}, expires {issued.get('expires')})"
    )
    if not options.output:
        print(token)
        print(what, file=sys.stderr)
        return 0
    try:
        fd = os.open(options.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
    except OSError as e:
        raise CliError(f"cannot write {options.output}: {e}") from None
    print(f"{what} written to {options.output}")
    return 0


def _token_revoke(options: argparse.Namespace) -> int:
    client = connect(options)
    try:
        call(client, lambda: client.revoke_token(options.jti, options.mesh))
    except ApiError as e:
        raise CliError(str(e)) from None
    print(f"token {options.jti} revoked")
    return 0


def _inspect(options: argparse.Namespace) -> int:
    client = connect(options)
    try:
        status = call(client, lambda: client.dataplane_status(options.mesh, options.name))
    except ApiError as e:
        if e.status == 404:
            raise CliError(
                f"{address(DATAPLANE_KIND, options.mesh, options.name)} not found"
            ) from None
        raise CliError(str(e)) from None
    if options.output == "json":
        print(json.dumps(status, indent=2))
    elif options.output == "yaml":
        print(yaml.safe_dump(status, sort_keys=False), end="")
    else:
        print(inspection(status), end="")
    return 0


def _stat(options: argparse.Namespace) -> int:
    from meshling.controlplane.stat_view import parse_seconds, stat_table

    try:
        window = parse_seconds(options.window, "--window")
    except ValueError as e:
        raise CliError(str(e), 2) from None
    client = connect(options)
    try:
        body = call(client, lambda: client.stats(options.mesh, window, options.service, options.by))
    except ApiError as e:
        raise CliError(str(e)) from None
    if options.output == "json":
        print(json.dumps(body, indent=2))
    elif options.service and not body.get("services"):
        raise CliError(f"no service {options.service!r} in mesh {options.mesh!r}")
    else:
        print(stat_table(body, options.by), end="")
    return 0


def _tap(options: argparse.Namespace) -> int:
    from meshling.controlplane.stat_view import parse_seconds, tap_end, tap_line

    try:
        duration = parse_seconds(options.duration, "--duration")
    except ValueError as e:
        raise CliError(str(e), 2) from None
    query = {
        "mesh": options.mesh,
        "service": options.service,
        "sample": f"{options.sample:g}",
        "max": str(options.max),
        "duration": f"{duration:g}",
    }
    for name in ("direction", "method", "path", "status"):
        if getattr(options, name):
            query[name] = getattr(options, name)
    client = connect(options)
    try:
        for event in call(client, lambda: _started(client.tap(query, duration))):
            if options.output == "json":
                print(json.dumps(event, separators=(",", ":")), flush=True)
            elif "end" in event:
                print(tap_end(event), file=sys.stderr, flush=True)
            else:
                print(tap_line(event), flush=True)
    except ApiError as e:
        raise CliError(str(e)) from None
    except Unreachable as e:
        raise CliError(str(e), 2) from None
    except KeyboardInterrupt:
        return 0
    return 0


def _started(events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """`events` with its first item read now, so that a refusal of the request (an
    unknown service, a bad filter) is raised here rather than while iterating."""
    try:
        first = next(events)
    except StopIteration:
        return iter(())
    return itertools.chain((first,), events)


def _explain(options: argparse.Namespace) -> int:
    from meshling.controlplane.explain import render_text

    query = [
        ("mesh", options.mesh),
        ("source", options.source),
        ("destination", options.destination),
        ("method", options.method),
        ("path", options.path),
    ]
    query += [("header", h) for h in options.header]
    if options.dataplane:
        query.append(("dataplane", options.dataplane))
    if options.port is not None:
        query.append(("port", str(options.port)))
    client = connect(options)
    try:
        answer = call(client, lambda: client.explain(query))
    except CliError as e:  # a refused token: not an answer about the request
        raise CliError(str(e), 2) from None
    except ApiError as e:  # bad input, an unknown mesh or service
        raise CliError(str(e), 2) from None
    if options.output == "json":
        print(json.dumps(answer, indent=2, ensure_ascii=False))
    else:
        print(render_text(answer), end="")
    return 0 if answer.get("allowed") is True else 1


def _check(options: argparse.Namespace) -> int:
    from meshling.controlplane.check import Result, evaluate, parse_window, report

    try:
        window = parse_window(options.expiry_warning)
    except ValueError as e:
        raise CliError(f"--expiry-warning: {e}", 2) from None
    client = connect(options)
    results = []
    try:
        client.healthz()
    except (Unreachable, ApiError) as e:
        print(report([Result("control plane", False, str(e))]), end="")
        return 2
    results.append(Result("control plane", True, f"{client.url} answers"))
    statuses = call(client, lambda: client.dataplane_statuses(options.mesh))
    results.append(Result("control plane", True, f"it takes {client.token_source}"))
    results.extend(evaluate(statuses, datetime.now(UTC), window))
    print(report(results), end="")
    return 0 if all(r.ok for r in results) else 1


def inspection(status: dict[str, Any]) -> str:
    """A dataplane's status for a person: the stream, then the snapshot as YAML."""
    nack = status.get("last_nack")
    online = "online" if status.get("online") else "offline"
    lines = [
        f"Dataplane:     {status.get('mesh')}/{status.get('name')} (service {status.get('service')})",
        f"Status:        {online}, last seen {status.get('last_seen') or 'never'}"
        + (f" via {status['replica']}" if status.get("replica") else ""),
        f"Connected at:  {status.get('connected_at') or '-'}",
        f"Snapshot:      {status.get('snapshot_version') or '-'} (current)",
        f"Pushed:        {status.get('pushed') or '-'}",
        f"Applied:       {status.get('applied') or '-'}",
        "Last NACK:     "
        + (
            f"{nack.get('version')} at {nack.get('at')}: {nack.get('reason')}"
            if isinstance(nack, dict)
            else "-"
        ),
        f"Certificate:   expires {status.get('certificate_expires') or '- (none signed)'}",
    ]
    snapshot = status.get("snapshot")
    if snapshot is None:
        lines.append(f"No snapshot: {status.get('snapshot_error', 'unknown')}")
        return "\n".join(lines) + "\n"
    return "\n".join(lines) + "\n---\n" + yaml.safe_dump(snapshot, sort_keys=False)


# reading and checking documents


def read_documents(target: str) -> list[Document]:
    """The documents of a file, of every matching file of a directory, or of stdin (`-`)."""
    if target == "-":
        return parse_documents(sys.stdin.read(), "stdin")
    path = Path(target)
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in APPLY_SUFFIXES
        )
        if not files:
            raise CliError(f"{target}: no *.yaml, *.yml or *.json files in the directory")
    elif path.exists():
        files = [path]
    else:
        raise CliError(f"{target}: no such file or directory")
    documents: list[Document] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"{file}: cannot read: {e}") from None
        documents.extend(parse_documents(text, str(file)))
    return documents


def parse_documents(text: str, source: str) -> list[Document]:
    """The documents of one file; malformed YAML is an error naming the document, line
    and column (read before anything is sent, so nothing is applied)."""
    loaded: list[Any] = []
    try:
        for content in yaml.safe_load_all(text):
            loaded.append(content)
    except yaml.YAMLError as e:
        raise CliError(malformed(source, len(loaded) + 1, e) + "; nothing applied") from None
    return [
        Document(source, index, content)
        for index, content in enumerate(loaded, start=1)
        if content is not None  # an empty document, as between two `---`
    ]


def malformed(source: str, index: int, error: yaml.YAMLError) -> str:
    """A YAML syntax error as `FILE (document N, line L, column C): malformed YAML: ...`."""
    mark = getattr(error, "problem_mark", None)
    where = f"{source} (document {index}"
    if mark is not None:
        where += f", line {mark.line + 1}, column {mark.column + 1}"
    problem = getattr(error, "problem", None)
    if not problem:
        return f"{where}): malformed YAML: {error}"
    context = getattr(error, "context", None)
    return f"{where}): malformed YAML: {problem}" + (f" ({context})" if context else "")


def check(document: Document) -> str | None:
    """Why the control plane would refuse `document`, as `FILE (document N): field: reason`."""
    metadata = document.content.get("metadata")
    version = metadata.get("version") if isinstance(metadata, dict) else None
    if version is not None and given_version(document.content) is None:
        return (
            f"{document.where}: metadata.version: expected the positive integer the "
            f"resource was read at, got {version!r} (leave it out to apply regardless)"
        )
    content = without_read_only(document.content)
    try:
        json.dumps(content, allow_nan=False)
    except (TypeError, ValueError) as e:
        return f"{document.where}: cannot be represented as JSON: {e}"
    try:
        parse_resource(content, document.source)
    except SnapshotError as e:
        where = f"{e.path}: " if e.path else ""
        return f"{document.where}: {where}{e.reason}"
    return None


def preflight(client: Client, documents: list[Document], *, allow_unmatched: bool) -> list[str]:
    """Why the control plane would refuse valid documents, given what it stores: a
    policy that selects no dataplane, a document read at a version that is no longer
    current. One line per refused document; empty when every one would be taken."""
    problems: list[str] = []
    # dataplanes by mesh and name: the stored ones, then those of this apply as it goes
    dataplanes: dict[str, dict[str, Dataplane]] = {}

    def of_mesh(mesh: str) -> dict[str, Dataplane]:
        if mesh not in dataplanes:
            listed = call(client, lambda: client.list_resources(DATAPLANE_KIND, mesh))
            dataplanes[mesh] = {}
            for item in listed:
                try:
                    stored = parse_dataplane(without_read_only(item), "control plane")
                except SnapshotError:
                    continue  # one that no longer parses selects nothing
                dataplanes[mesh][stored.name] = stored
        return dataplanes[mesh]

    for document in documents:
        kind, mesh, name = identity(document.content)
        resource = parse_resource(without_read_only(document.content), document.source)
        version = given_version(document.content)
        if version is not None:
            stale = _stale(client, document, version)
            if stale:
                problems.append(stale)
                continue
        if kind == DATAPLANE_KIND:
            of_mesh(mesh)[name] = resource
            continue
        policy = policy_type(kind)
        if policy is None or allow_unmatched:
            continue
        selection = policy.selects(resource, of_mesh(mesh).values())
        if selection.empty:
            problems.append(
                f"{document.where}: {selection.field}: {selection.unmatched(mesh)} (apply "
                "it once they register, or store it anyway with --allow-unmatched)"
            )
    return problems


def _stale(client: Client, document: Document, version: int) -> str | None:
    """Why a document read at `version` would be refused, if the stored one moved on."""
    kind, mesh, name = identity(document.content)
    what = address(kind, mesh, name)
    try:
        current = call(client, lambda: client.read(kind, mesh, name))
    except ApiError as e:
        if e.status != 404:
            raise CliError(f"{document.where}: {e}") from None
        return (
            f"{document.where}: metadata.version: {what} was read at version {version} "
            "and has been deleted since (leave metadata.version out to create it again)"
        )
    stored = current.get("metadata", {}).get("version")
    if stored == version:
        return None
    return (
        f"{document.where}: metadata.version: stale version {version}: {what} is at "
        f"version {stored}, someone changed it since it was read. Read it again "
        f"(meshling get {kind} {name} --mesh {mesh} -o yaml), redo the change on that, "
        "and apply it"
    )


def refusal(error: ApiError, document: Document) -> str:
    """An API refusal of one document while applying, with what to do about it."""
    if error.status == 409 and "current" in error.body:
        kind, mesh, name = identity(document.content)
        return (
            f"metadata.version: stale version {error.body.get('given')}: "
            f"{address(kind, mesh, name)} is at version {error.body.get('current')}, someone "
            "changed it since it was read. Read it again, redo the change, and apply it"
        )
    if error.body.get("unmatched") and error.field and error.reason:
        return f"{error.field}: {error.reason} (store it anyway with --allow-unmatched)"
    return str(error)


# talking to the control plane


def connect(options: argparse.Namespace) -> Client:
    config, path = read_config(options)
    url, url_source = _setting(options.cp, "MESHLING_CP", config, "cp", path)
    url = (url or DEFAULT_CP).rstrip("/")
    if not url.startswith(("http://", "https://")):
        where = url_source or "--cp"
        raise CliError(f"{where}: expected an http:// or https:// URL, got {url!r}", 2)
    token, source = find_token(options, config, path)
    ca_file, _ = _setting(options.cp_ca_file, "MESHLING_CP_CA_FILE", config, "ca_file", path)
    return Client(url, token, token_source=source, ca_file=ca_file)


CONFIG_KEYS = ("cp", "token", "token_file", "ca_file")


def config_path(options: argparse.Namespace) -> tuple[Path | None, bool]:
    """The CLI config file to read, and whether it was asked for (then it must exist)."""
    if options.config:
        return Path(options.config), True
    if os.environ.get("MESHLING_CLI_CONFIG"):
        return Path(os.environ["MESHLING_CLI_CONFIG"]), True
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    path = Path(base) / "meshling" / "config.yaml"
    return (path, False) if path.is_file() else (None, False)


def read_config(options: argparse.Namespace) -> tuple[dict[str, str], str]:
    """The CLI config file's settings (empty when there is none) and its path."""
    path, required = config_path(options)
    if path is None:
        return {}, ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise CliError(f"the config file {path} does not exist", 2) from None
        return {}, ""
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read the config file {path}: {e}", 2) from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CliError(malformed(str(path), 1, e), 2) from None
    if content is None:
        return {}, str(path)
    if not isinstance(content, dict):
        raise CliError(f"{path}: must be a mapping of {', '.join(CONFIG_KEYS)}", 2)
    settings: dict[str, str] = {}
    for key, value in content.items():
        if key not in CONFIG_KEYS:
            raise CliError(f"{path}: {key}: unknown setting (known: {', '.join(CONFIG_KEYS)})", 2)
        if not isinstance(value, str) or not value:
            raise CliError(f"{path}: {key}: must be a non-empty string, got {value!r}", 2)
        if key in ("token_file", "ca_file"):
            # relative to the config file, so the file works from any directory
            value = str(path.parent / os.path.expanduser(value))
        settings[key] = value
    return settings, str(path)


def _setting(
    flag: str | None, env: str, config: dict[str, str], key: str, path: str
) -> tuple[str | None, str]:
    """A setting from its flag, its environment variable or the config file, in that
    order, and where it came from (empty for a flag)."""
    if flag:
        return flag, ""
    if os.environ.get(env):
        return os.environ[env], f"${env}"
    if key in config:
        return config[key], f"{path}: {key}"
    return None, ""


def find_token(
    options: argparse.Namespace, config: dict[str, str] | None = None, path: str = ""
) -> tuple[str | None, str]:
    """The admin token and a description of where it came from."""
    config = config or {}
    if options.token:
        return options.token, "the token given with --token"
    if options.token_file:
        return _read_token(options.token_file), f"the token in {options.token_file} (--token-file)"
    if os.environ.get("MESHLING_ADMIN_TOKEN"):
        return os.environ["MESHLING_ADMIN_TOKEN"], "the token in $MESHLING_ADMIN_TOKEN"
    env_file = os.environ.get("MESHLING_ADMIN_TOKEN_FILE")
    if env_file:
        return _read_token(env_file), f"the token in {env_file} ($MESHLING_ADMIN_TOKEN_FILE)"
    if "token" in config:
        return config["token"], f"the token in {path}"
    if "token_file" in config:
        file = config["token_file"]
        return _read_token(file), f"the token in {file} ({path}: token_file)"
    for default in (DEFAULT_TOKEN_FILE, CP_TOKEN_FILE):
        if Path(default).is_file():
            return _read_token(default), f"the token in ./{default}"
    return None, "no token (none was given)"


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read the admin token file {path}: {e}", 2) from None
    if not token:
        raise CliError(f"the admin token file {path} is empty", 2)
    return token


def call(client: Client, request: Callable[[], T]) -> T:
    """`request()`, with an unreachable control plane and a refused token as `CliError`s."""
    try:
        result = request()
    except Unreachable as e:
        raise CliError(str(e), 2) from None
    except ApiError as e:
        if e.status == 401:
            source = client.token_source
            raise CliError(
                f"the control plane at {client.url} refused {source}: {e.message}. Give the "
                "admin token with --token or --token-file, or set MESHLING_ADMIN_TOKEN or "
                "MESHLING_ADMIN_TOKEN_FILE; `meshling control-plane run` writes it to its "
                f"--token-file ({CP_TOKEN_FILE} by default). A dataplane token is not an "
                "admin token",
                1,
            ) from None
        raise
    return result


def _not_found(error: ApiError, kind: str, mesh: str, name: str) -> str:
    if error.status == 404:
        return f"{address(kind, mesh, name)} not found"
    return str(error)


# output


def canonical_kind(given: str) -> str:
    """A kind as the API spells it, from any case and an optional plural `s`."""
    by_lower = {k.lower(): k for k in kinds()}
    lower = given.lower()
    kind = by_lower.get(lower) or (by_lower.get(lower[:-1]) if lower.endswith("s") else None)
    if kind is None:
        raise CliError(f"unknown kind {given!r} (known: {', '.join(kinds())})")
    return kind


def parse_selector(raw: str) -> dict[str, str]:
    try:
        return read_selector(raw)
    except ValueError as exc:
        raise CliError(f"-l: {exc}", 2) from None


def address(kind: str, mesh: str, name: str) -> str:
    return f"{kind}/{name}" if kind == MESH_KIND else f"{kind}/{mesh}/{name}"


def dataplane_statuses(
    client: Client, mesh: str | None
) -> dict[tuple[str, str], dict[str, Any]] | None:
    """The stream status of each dataplane; None from a control plane without streams, or
    when none of the dataplanes ever had one (they are run from files, say), so that the
    table shows stream columns only when they say something."""
    try:
        items = client.dataplane_statuses(mesh)
    except (ApiError, Unreachable):
        return None
    if not any(i.get("last_seen") for i in items):
        return None
    return {(str(i.get("mesh")), str(i.get("name"))): i for i in items}


def table(
    kind: str,
    resources: list[dict[str, Any]],
    now: datetime | None = None,
    statuses: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> str:
    now = now or datetime.now(UTC)
    header = ["NAME", "MESH", "VERSION", "AGE"]
    if kind == DATAPLANE_KIND:
        header.append("SERVICE")
        if statuses is not None:
            header += ["ONLINE", "APPLIED"]
    rows = [header]
    for resource in resources:
        metadata = resource.get("metadata") or {}
        name = str(metadata.get("name", ""))
        mesh = name if kind == MESH_KIND else str(metadata.get("mesh", ""))
        row = [name, mesh, str(metadata.get("version", "")), age(metadata.get("created"), now)]
        if kind == DATAPLANE_KIND:
            row.append(str((resource.get("spec") or {}).get("service", "")))
            if statuses is not None:
                status = statuses.get((mesh, name)) or {}
                row.append("yes" if status.get("online") else "no")
                row.append(str(status.get("applied") or "-"))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in rows
    )


def age(created: Any, now: datetime) -> str:
    """`created` (ISO 8601) as an age: `42s`, `5m`, `3h`, `2d`."""
    try:
        then = datetime.fromisoformat(str(created))
    except ValueError:
        return "?"
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
