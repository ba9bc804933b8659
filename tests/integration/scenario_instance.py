"""One upstream instance of the reliability scenario, run as a process of its own so that a
test can kill it with SIGKILL.

    python scenario_instance.py NAME LOG [--fail-ratio R] [--seed S]

Listens on 127.0.0.1 on a free port and prints the port on its first line of stdout.
`GET /healthz` answers 200 `ok`; any other GET answers 200 with the instance's name, or,
with `--fail-ratio`, 503 for that share of requests (seeded, so a run is repeatable).
Every request but the health path is appended to LOG as `<wall-clock time> <status>`, one
line and one write each, so the lines survive a SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HEALTH_PATH = "/healthz"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("log")
    parser.add_argument("--fail-ratio", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    lock = threading.Lock()
    rnd = random.Random(args.seed)
    # line-buffered: a write(2) per request; open until the process ends
    log = open(args.log, "a", buffering=1)  # noqa: SIM115
    name = args.name.encode() + b"\n"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # no response waits for the proxy's delayed ACK of the one before (Nagle)
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            if self.path == HEALTH_PATH:
                self.answer(200, b"ok\n")
                return
            with lock:
                failing = rnd.random() < args.fail_ratio
                status = 503 if failing else 200
                log.write(f"{time.time():.6f} {status}\n")
            self.answer(status, b"unavailable\n" if failing else name)

        def answer(self, status: int, body: bytes) -> None:
            # head and body in one write: a kill never leaves the proxy a head without its
            # body (a response that started cannot be retried)
            reason = self.responses[status][0].encode()
            head = b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n\r\n" % (status, reason, len(body))
            self.wfile.write(head + body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # the default backlog (5) drops the SYNs of a proxy opening connections in a burst
        request_queue_size = 128

        def handle_error(self, request: Any, client_address: Any) -> None:
            # the proxy resets the connection of an attempt it retries: not worth a traceback
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
