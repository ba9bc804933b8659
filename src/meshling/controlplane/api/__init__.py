"""The control plane's REST API: resources over HTTP, behind an admin token.

* `app` — `create_app(store, admin_token, ca=None, signer=None, distributor=None)`, the
  ASGI app (routes in its docstring); with a CA and a token signer it also issues
  dataplane tokens and signs CSRs for the token's service (`ca`); with a distributor, the
  config stream and the dataplane status routes (`status`);
* `openapi` — the OpenAPI 3 document it serves at `/openapi.json`;
* `server` — `run(store_url, host, port, token_file, ...)`, the whole control plane on
  uvicorn: shared secrets from the store, the distributor, the app.

The web libraries (Starlette, uvicorn) are imported only in this package; the proxy never
imports it.
"""

from __future__ import annotations

from meshling.controlplane.api.app import create_app
from meshling.controlplane.api.server import ensure_admin_token, run

__all__ = ["create_app", "ensure_admin_token", "run"]
