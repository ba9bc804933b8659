"""The proxy's control-plane client: how `meshling proxy run --cp` gets its identity and
its snapshots, and keeps serving when the control plane is away.

* `backoff` — reconnect delays (exponential, full jitter) and failover across the
  control-plane addresses (sans-I/O);
* `renewal` — when to renew the proxy's certificate: at half its life (sans-I/O);
* `datadir` — the on-disk cache (snapshot, certificate, key, trust bundle), written
  atomically, 0600 in a 0700 directory;
* `settings` — the start-up inputs (addresses, token file, Dataplane document) and
  their errors;
* `sign` — the certificate request (`POST /api/v1/ca/sign`), over a plain asyncio
  HTTP/1.1 connection;
* `agent` — the loop that ties them to a running `Proxy`.

Nothing here is imported by a standalone proxy.
"""
