"""The chaos suite's long form (`make chaos`): faults one at a time, under steady traffic.

The traffic goes through a mesh across network namespaces; a table of results follows.

Five hosts (network namespaces joined by a bridge, tests/integration/hosts.py): a control
plane, a client whose app sends idempotent GETs at a steady rate through its proxy, and
three instances of the called service (nginx behind a proxy each); mTLS strict, with
Retry, Timeout, CircuitBreaker (outlier detection) and HealthCheck on. The scenarios and
their targets are in tests/integration/chaos.py; the short form of the same runs in
`make test` (tests/integration/test_chaos.py).

    .venv/bin/python bench/chaos.py                    # the long form: about eight minutes
    .venv/bin/python bench/chaos.py --short            # the test's timings
    .venv/bin/python bench/chaos.py --only "host cut off" "rolling restart"

Needs root (network namespaces, iptables, tc) and nginx. Every namespace and process is
removed at the end, also on errors and Ctrl-C. Exits 1 when a scenario misses its target.
The results also go to bench/results/chaos.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.chaos import LONG, SCENARIOS, SHORT, ChaosMesh, Result, render  # noqa: E402
from tests.integration.hosts import Network, cleanup_leftovers  # noqa: E402


def main(argv: list[str]) -> int:
    names = [name for name, _ in SCENARIOS]
    parser = argparse.ArgumentParser(prog="bench/chaos.py", description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="the short form's timings")
    parser.add_argument("--only", nargs="+", choices=names, metavar="SCENARIO", default=names)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/chaos.py: needs root (network namespaces, iptables, tc)", file=sys.stderr)
        return 2
    timing = SHORT if args.short else LONG
    removed = cleanup_leftovers()
    if removed:
        print(f"removed {len(removed)} namespaces of earlier runs that had died")
    workdir = Path(tempfile.mkdtemp(prefix="meshling-chaos-"))
    network = Network(ChaosMesh.host_names(), workdir)
    results: list[Result] = []
    began = time.monotonic()
    try:
        chaos = ChaosMesh(network)
        chaos.start()
        print(f"mesh up in {time.monotonic() - began:.1f}s (logs in {workdir})", flush=True)
        for name, fault in SCENARIOS:
            if name not in args.only:
                continue
            result = chaos.run(name, timing, fault)
            results.append(result)
            verdict = "PASS" if result.passed else "FAIL: " + "; ".join(result.problems)
            print(
                f"  {name}: {result.sent} sent, {result.failed} failed, "
                f"p99 {result.p99 * 1000:.1f} ms: {verdict}",
                flush=True,
            )
    finally:
        network.close()
    print()
    print(render(results, timing))
    print(f"\n{len(results)} scenarios in {time.monotonic() - began:.0f}s")
    out = ROOT / "bench" / "results" / "chaos.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
