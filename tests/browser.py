"""A real headless Chromium (Debian's `chromium`) driven by playwright, for the pages.

Playwright's own browser builds are never downloaded: it launches the system binary.
Every page opened through `Watched` records console errors, uncaught exceptions and
Content-Security-Policy violations; `Watched.assert_clean` fails the test on any of them
except the HTTP errors the test says it expects (Chromium logs every 4xx a script
fetches as a console error, e.g. the 401 of a wrong key)."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from playwright.async_api import Browser, ConsoleMessage, Page, Playwright

CHROMIUM = os.environ.get("METERING_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
TIMEOUT_MS = 10_000  # every wait on the DOM is bounded by this
_HTTP_ERROR = re.compile(r"^Failed to load resource: the server responded with a status of (\d{3})")
_CSP_PROBE = """
document.addEventListener('securitypolicyviolation', (e) => {
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || 'inline'} at ${e.sourceFile}`);
});
"""


def shown(amount: str) -> str:
    """The pages' money format (web/common/ui.js `usd`): at least 2 decimals, no trailing zeros."""
    sign, digits = ("−", amount[1:]) if amount.startswith("-") else ("", amount)
    whole, _, fraction = digits.partition(".")
    return f"{sign}${int(whole):,}.{fraction.rstrip('0').ljust(2, '0')}"


async def launch(playwright: Playwright) -> Browser:
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: apt-get install chromium (see .ci/run)"  # noqa: ASYNC240
    return await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)


@dataclass
class Watched:
    """A page in a fresh browser context (its own sessionStorage), watched for errors."""

    page: Page
    problems: list[str] = field(default_factory=list)
    http_errors: list[tuple[str, int]] = field(default_factory=list)  # (path, status)

    @classmethod
    async def open(cls, browser: Browser, **context: Any) -> Watched:
        ctx = await browser.new_context(viewport={"width": 1360, "height": 900}, **context)
        ctx.set_default_timeout(TIMEOUT_MS)
        await ctx.add_init_script(_CSP_PROBE)
        watched = cls(await ctx.new_page())
        watched.page.on("console", watched._console)
        watched.page.on("pageerror", lambda exc: watched.problems.append(f"uncaught: {exc}"))
        return watched

    def _console(self, message: ConsoleMessage) -> None:
        if message.type not in ("error", "warning", "assert"):
            return
        http = _HTTP_ERROR.match(message.text)
        if http and message.type == "error":
            self.http_errors.append((urlsplit(message.location.get("url", "")).path, int(http.group(1))))
        else:
            self.problems.append(f"console {message.type}: {message.text} ({message.location.get('url')})")

    def assert_clean(self, expected_http: set[tuple[str, int]] = frozenset()) -> None:  # type: ignore[assignment]
        """No console error, uncaught exception or CSP violation; HTTP errors only those expected."""
        unexpected = [e for e in self.http_errors if e not in expected_http]
        assert not self.problems and not unexpected, f"browser problems: {self.problems}, HTTP errors: {unexpected}"

    async def close(self) -> None:
        await self.page.context.close()
