"""The web GUI, served by the control plane at `/gui/`: static files (HTML, one CSS file,
plain ES modules; no build step) that read the REST API with the admin token.

The files themselves are served without a token, as they hold no data: the page takes
the token from the address's fragment (`/gui/#token=...`, which never reaches the server
or its logs) or from a sign-in form, keeps it in the tab's sessionStorage, and sends it
as `Authorization: Bearer` on each API call. `/` redirects to `/gui/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from meshling.controlplane.gui.assets import answer, load_assets

STATIC_DIR: Final = Path(__file__).parent / "static"
PREFIX: Final = "/gui/"


@dataclass(frozen=True, slots=True)
class Gui:
    """The GUI's routes, and the paths they answer, which need no token."""

    routes: list[BaseRoute]
    open_paths: frozenset[str]


def gui(directory: Path = STATIC_DIR) -> Gui:
    """The routes serving the files in `directory` under `/gui/`."""
    assets = load_assets(directory)

    async def file(request: Request) -> Response:
        name = str(request.path_params.get("name", ""))
        result = answer(assets, name, request.headers.get("if-none-match"))
        body = b"" if request.method == "HEAD" else result.body
        response = Response(body, status_code=result.status, headers=result.headers)
        if request.method == "HEAD" and result.status == 200:
            response.headers["Content-Length"] = str(len(result.body))
        return response

    async def to_gui(request: Request) -> Response:
        return RedirectResponse(PREFIX, status_code=307)

    routes: list[BaseRoute] = [
        Route("/", to_gui, methods=["GET", "HEAD"]),
        Route("/gui", to_gui, methods=["GET", "HEAD"]),
        Route(PREFIX, file, methods=["GET", "HEAD"]),
        Route(PREFIX + "{name}", file, methods=["GET", "HEAD"]),
    ]
    open_paths = frozenset({"/", "/gui", PREFIX, *(PREFIX + name for name in assets)})
    return Gui(routes, open_paths)
