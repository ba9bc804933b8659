"""HTTP/2 and gRPC without I/O: header mapping, gRPC framing rules, abuse accounting.

The proxy's HTTP/2 connections (`proxy.http2`) use the `h2` library for frames, HPACK,
streams and flow control; what the mesh decides on top of it lives here, as pure
functions and small classes driven by a clock argument, so tests run them without
sockets:

- `headers`: a request's pseudo-header fields and the translation between HTTP/2 and
  HTTP/1.1 field lists (connection-specific fields dropped, Host and :authority);
- `grpc`: `grpc-timeout`, the gRPC status a proxy's own reply carries, and which gRPC
  statuses a Retry policy's conditions name;
- `guard`: the per-connection budgets that stop Rapid Reset, SETTINGS/PING and other
  control-frame floods (the offender gets GOAWAY).
"""
