"""The pages as HTTP sees them: served from the package with a strict CSP and sane
caching, public on the admin listener where nothing else is, switchable on the client
listener, and shipped by a non-editable install (a wheel, as the Dockerfile builds)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict

from proxy import pages

from .conftest import Running

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "proxy" / "web"


async def fetch(url: str, method: str = "GET", **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers) as resp:
            return resp.status, CIMultiDict(resp.headers), await resp.read()


def assert_strict(headers: CIMultiDict[str]) -> None:
    csp = {d.split()[0]: d.split()[1:] for d in headers["Content-Security-Policy"].split("; ")}
    assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"]
    assert csp["require-trusted-types-for"] == ["'script'"]
    assert not any("unsafe" in src or src in ("*", "data:", "http:", "https:") for d in csp.values() for src in d)
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    assert headers["Cache-Control"] == "no-cache" and headers["ETag"].startswith('"')


async def test_console_is_served_without_the_token_and_nothing_else_is(proxy: Running) -> None:
    status, headers, body = await fetch(proxy.admin_url + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert_strict(headers)
    assert b'<script type="module" src="/console/console.js">' in body and b"<script>" not in body
    for name, kind in (("console.js", "text/javascript"), ("ui.js", "text/javascript"), ("base.css", "text/css")):
        status, headers, body = await fetch(f"{proxy.admin_url}/console/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind), name
        assert_strict(headers)
        assert (
            body
            == ((WEB / "console" / name) if (WEB / "console" / name).exists() else WEB / "common" / name).read_bytes()
        )
    # unchanged: 304 with no body; HEAD answers the headers alone
    etag = (await fetch(proxy.admin_url + "/console/ui.js"))[1]["ETag"]
    status, _, body = await fetch(proxy.admin_url + "/console/ui.js", **{"If-None-Match": etag})
    assert (status, body) == (304, b"")
    assert (await fetch(proxy.admin_url + "/console/ui.js", **{"If-None-Match": '"other"'}))[0] == 200
    status, headers, body = await fetch(proxy.admin_url + "/", "HEAD")
    assert status == 200 and body == b"" and "Content-Security-Policy" in headers
    # a page's path opens nothing else: no traversal, no other file, and the API still wants its token
    for path in ("/console/..%2fadmin.py", "/console/index.html", "/console/usage.js", "/console/x.py", "/console/"):
        status, _, _ = await fetch(proxy.admin_url + path)
        assert status in (401, 404), path
    for path in ("/admin/v1/accounts", "/console", "/admin/v1/openapi.json"):
        assert (await fetch(proxy.admin_url + path))[0] == 401, path


async def test_usage_page_is_on_by_default_and_off_is_a_404(start_proxy: Callable[..., Any]) -> None:
    on = await start_proxy()
    status, headers, body = await fetch(on.url + "/usage")
    assert status == 200 and b'src="/usage/usage.js"' in body
    assert_strict(headers)
    assert (await fetch(on.url + "/usage/usage.js"))[0] == 200
    assert (await fetch(on.url + "/usage/console.js"))[0] == 404  # the console is the admin listener's
    assert (await fetch(on.url + "/"))[0] == 404
    off = await start_proxy({"server": {"usage_page": False}})
    for path in ("/usage", "/usage/usage.js", "/usage/base.css"):
        status, _, body = await fetch(off.url + path)
        assert status == 404 and b'"type":"invalid_request_error"' in body, path


def test_page_files_are_only_what_the_folders_hold() -> None:
    console, usage = pages.Page.load("console"), pages.Page.load("usage")
    common = {p.name for p in (WEB / "common").iterdir()}
    assert set(console.assets) == common | {p.name for p in (WEB / "console").iterdir()} - {"index.html"}
    assert set(usage.assets) == common | {p.name for p in (WEB / "usage").iterdir()} - {"index.html"}


def test_a_non_editable_install_ships_the_pages(tmp_path: Path) -> None:
    """What the Dockerfile does: `pip install .` on the files it copies (no stale build/
    directory to hide a missing package-data rule), into a clean target."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "proxy", source / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=240,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("metering_proxy-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {str(p.relative_to(ROOT)) for p in WEB.rglob("*") if p.is_file()}
    assert wanted and wanted <= shipped, sorted(wanted - shipped)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    check = "from proxy import pages; import proxy; print(proxy.__file__, len(pages.Page.load('console').assets))"
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         check=True, capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert out.startswith(str(target)) and int(out.split()[1]) >= 4, out
