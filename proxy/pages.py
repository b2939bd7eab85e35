"""The browser pages: the operator console (admin listener, `/`) and the customer usage
page (client listener, `/usage`).

Both are static files shipped in the package (`proxy/web/PAGE/`, plus `proxy/web/common/`
shared by both), read once at startup and served as they are: no build step, nothing
from another origin. Every answer carries a strict Content-Security-Policy (scripts,
styles and connections only from this origin, no inline code, no framing) with Trusted
Types enforced, so a script that tried `innerHTML` with a string would throw instead of
rendering markup. The pages talk only to the documented JSON APIs with a bearer token
they keep in the browser's sessionStorage.

Files are revalidated on every load (`no-cache` with a strong ETag: a reload after an
upgrade never mixes old and new scripts) and answer 304 when unchanged.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",  # forms are handled by script, never submitted
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "Cache-Control": "no-cache",
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
ASSET_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*\.(js|css|svg)$")


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def of(cls, name: str, body: bytes) -> Asset:
        suffix = name[name.rindex(".") :]
        return cls(body, TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    def response(self, request: web.Request) -> web.Response:
        headers = {**HEADERS, "ETag": self.etag}
        if self.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.body, headers={**headers, "Content-Type": self.content_type})


@dataclass(frozen=True, slots=True)
class Page:
    """One page: its index.html and the files it may load (its own, then common/)."""

    index: Asset
    assets: dict[str, Asset]

    @classmethod
    def load(cls, name: str) -> Page:
        web_dir = resources.files("proxy") / "web"
        assets: dict[str, Asset] = {}
        for folder in ("common", name):  # a page's own file wins over a common one
            for item in (web_dir / folder).iterdir():
                if ASSET_NAME.match(item.name):
                    assets[item.name] = Asset.of(item.name, item.read_bytes())
        return cls(Asset.of("index.html", (web_dir / name / "index.html").read_bytes()), assets)

    def asset(self, request: web.Request) -> web.Response:
        found = self.assets.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        return found.response(request)


Guard = Callable[[web.Request], bool]  # False: the page is switched off (a 404)
ROUTE_PREFIX = "page-"  # the route names of pages: what the admin listener serves without its token


def add_page(app: web.Application, name: str, path: str, guard: Guard | None = None) -> None:
    """Serve page `name` at `path` and its files under `path`/NAME (`/` serves them
    under `/NAME/`). GET and HEAD only."""
    page = Page.load(name)
    prefix = path.rstrip("/") or f"/{name}"

    async def index(request: web.Request) -> web.StreamResponse:
        if guard is not None and not guard(request):
            raise web.HTTPNotFound()
        return page.index.response(request)

    async def asset(request: web.Request) -> web.StreamResponse:
        if guard is not None and not guard(request):
            raise web.HTTPNotFound()
        return page.asset(request)

    app.router.add_get(path, index, name=f"{ROUTE_PREFIX}{name}")
    app.router.add_get(prefix + "/{name}", asset, name=f"{ROUTE_PREFIX}{name}-asset")


def serves(request: web.Request) -> bool:
    """Whether `request` was routed to a page (public: the page holds no secret; its
    API calls carry the token)."""
    name = request.match_info.route.name
    return name is not None and name.startswith(ROUTE_PREFIX)
