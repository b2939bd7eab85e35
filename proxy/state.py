"""What the listeners share: the current config and the services built from it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from .accounts import Accounts
from .config import Config
from .keys import KeyCache
from .ledger import Ledger
from .pricing import Catalog
from .upstream import Upstream


@dataclass
class State:
    config: Config
    redis: Redis
    ledger: Ledger
    accounts: Accounts
    keys: KeyCache
    catalog: Catalog
    upstream: Upstream
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    # request id -> (account id, admitted at, monotonic s): reservations this instance holds
    inflight: dict[str, tuple[str, float]] = field(default_factory=dict)

    def use_config(self, config: Config, catalog: Catalog) -> None:
        """Swap in a reloaded config; requests in flight keep the objects they hold."""
        self.catalog = catalog
        self.ledger.use_config(config)
        self.config = config

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work that must finish even if its request is cancelled (kept referenced)."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task


STATE = web.AppKey("state", State)
