"""Structured JSON logs (structlog), with every configured secret and API key redacted."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import orjson
import structlog

_API_KEY = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")
REDACTED = "[REDACTED]"


class Redactor:
    """A structlog processor; secrets are swapped in on config reload."""

    def __init__(self) -> None:
        self.secrets: tuple[str, ...] = ()

    def use(self, secrets: Iterable[str]) -> None:
        self.secrets = tuple(s for s in secrets if len(s) >= 4)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _API_KEY.sub(REDACTED, text) if "sk-" in text else text

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for name, value in event.items():
            if isinstance(value, str):
                event[name] = self.scrub(value)
            elif not isinstance(value, (int, float, bool, type(None))):
                event[name] = self.scrub(str(value))
        return event


REDACTOR = Redactor()


def setup(level: str = "info", stream: Any = None) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            REDACTOR,
            structlog.processors.JSONRenderer(serializer=lambda obj, **_: orjson.dumps(obj).decode()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
