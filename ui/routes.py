"""The usage pages: static HTML, CSS and JavaScript read once from ``ui/static`` and served as they are.

The pages hold no data. In the browser they call the same public API as every other client (the meter
query, entitlement values, notification events, the audit log) with the visitor's key or portal token, so
every number on a page is a number the API answered, and a page can show nothing its credential may not
read. No build step, nothing fetched from elsewhere: the chart library (uPlot, MIT, vendored with its
license) is a file here too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from schemas.problems import PROBLEM_JSON, Problem

STATIC: Final = Path(__file__).with_name("static")

_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    "": "text/plain; charset=utf-8",  # the vendored library's LICENSE
}

#: Everything a page may load: its own scripts, styles and API calls; no inline script, no other origin.
_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'"
)

#: page path -> (file, may another site frame it). Only the widget is made to be embedded.
PAGES: Final = {
    "/ui/": ("overview.html", False),
    "/ui/subject": ("subject.html", False),
    "/ui/portal": ("portal.html", False),
    "/ui/widget": ("widget.html", True),
}


@dataclass(frozen=True)
class _File:
    body: bytes
    media_type: str
    etag: str


def _load(name: str) -> _File:
    body = (STATIC / name).read_bytes()
    return _File(body, _TYPES.get(Path(name).suffix, _TYPES[""]), '"' + hashlib.sha256(body).hexdigest()[:20] + '"')


def _headers(frameable: bool) -> dict[str, str]:
    ancestors = "*" if frameable else "'none'"
    return {
        "Content-Security-Policy": f"{_CSP}; frame-ancestors {ancestors}",
        "X-Content-Type-Options": "nosniff",
        # A portal token travels in the URL's fragment, which is never sent; no referrer leaves either.
        "Referrer-Policy": "no-referrer",
        # Revalidated on every load (a cheap 304): a new release is never mixed with an old script.
        "Cache-Control": "no-cache",
    }


def ui_routes(auth_enabled: bool) -> list[Route]:
    """``GET /ui/`` (operators' overview), ``/ui/subject``, ``/ui/portal`` (an end user's own usage),
    ``/ui/widget`` (the same, to embed in an iframe) and ``/ui/static/{name}``. Public: a page carries no
    data; the browser fetches it from the API with the credential the visitor gives. ``auth_enabled`` tells
    the pages whether to ask for a key."""
    files = {p.name: _load(p.name) for p in sorted(STATIC.iterdir()) if p.is_file()}
    mode = b"on" if auth_enabled else b"off"
    pages = {
        path: (_File(f.body.replace(b"{{auth}}", mode), f.media_type, f.etag[:-1] + mode.decode() + '"'), frame)
        for path, (name, frame) in PAGES.items()
        for f in [files[name]]
    }

    def answer(request: Request, file: _File, frameable: bool) -> Response:
        headers = {**_headers(frameable), "ETag": file.etag}
        if request.headers.get("if-none-match") == file.etag:
            return Response(status_code=304, headers=headers)
        return Response(file.body, media_type=file.media_type, headers=headers)

    async def page(request: Request) -> Response:
        file, frameable = pages[request.url.path]
        return answer(request, file, frameable)

    async def static(request: Request) -> Response:
        file = files.get(request.path_params["name"])
        if file is None or file.media_type.startswith("text/html"):
            return Response(orjson.dumps(Problem(404, "no such file").to_dict()), 404, media_type=PROBLEM_JSON)
        return answer(request, file, True)

    async def to_overview(request: Request) -> Response:
        return RedirectResponse("/ui/" + (f"?{request.url.query}" if request.url.query else ""), status_code=308)

    return [
        Route("/ui", to_overview, methods=["GET"]),
        *(Route(path, page, methods=["GET"]) for path in PAGES),
        Route("/ui/static/{name}", static, methods=["GET"]),
    ]
