"""The `meshling demo`: a whole mesh on one machine, configured by a control plane.

A `meshling control-plane run` on a SQLite file, and three services, each instance next
to its own `meshling proxy run --cp`: `web` (Python) calls `api` (Python, two versions),
which calls `store` (a stock nginx). The control plane holds the Mesh (mTLS strict) and
the TrafficPermissions; the proxies get their certificates and snapshots from it. A
traffic loop drives requests into web, and a summary table read from every proxy's
`/metrics` is printed as it runs.
"""
