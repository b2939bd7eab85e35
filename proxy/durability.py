"""Durable admin money writes (`redis.durable_admin_writes`).

A grant, void or adjustment answered 2xx must survive a Redis crash: with `appendfsync
everysec` the last second of acknowledged writes can be lost. With this on, the script
runs in one pipeline (one connection) with a barrier after it:

    EVALSHA grant|void|adjust ...   INCR mp:durable   WAITAOF 1 <replicas> 1000

WAITAOF waits until this connection's writes are fsynced to the AOF (and to the AOF of
`replicas` replicas). The INCR makes the barrier cover every write before it, from any
connection: a retried grant that finds its first attempt (`exists`) wrote nothing now.
A write applied but not confirmed in time is a 503 `write_not_durable`; retrying it with
the same idempotency key is safe.

Before Redis 7.2 there is no WAITAOF: with `durable_replicas` the barrier is `WAIT` (the
replicas have it in memory); without, a Redis that fsyncs every write (`appendonly yes`,
`appendfsync always`) needs no barrier, and any other refuses every admin money write
with a 503 that says why, before writing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from .config import Config

WAIT_MS = 1000  # below the 2 s socket timeout
WRITES = frozenset(("grant", "void", "adjust"))
APPLIED = frozenset(("created", "exists", "voided", "noop", "ok"))  # replies of a write that stands


@dataclass
class Durability:
    replicas: int
    barrier: tuple[Any, ...] | None = None  # after the write; () when none is needed; None: not probed
    unconfirmable: str | None = None  # why this Redis can confirm no write

    @classmethod
    def of(cls, config: Config) -> Durability | None:
        redis = config.redis
        return cls(redis.durable_replicas) if redis is not None and redis.durable_admin_writes else None

    async def probe(self, redis: Redis) -> str:
        """Find the barrier this Redis offers; returns it in words, for the startup log.
        Found once; a Redis that could confirm nothing is asked again (it may be fixed)."""
        if self.barrier is None:
            self.unconfirmable = None
            try:
                await redis.execute_command("WAITAOF", 0, 0, 1)  # type: ignore[no-untyped-call]
                self.barrier = ("WAITAOF", 1, self.replicas, WAIT_MS)
            except redis_errors.ResponseError:  # before Redis 7.2
                await self._without_waitaof(redis)
        return self.unconfirmable or (" ".join(map(str, self.barrier)) if self.barrier else "appendfsync always")

    async def _without_waitaof(self, redis: Redis) -> None:
        if self.replicas:
            self.barrier = ("WAIT", self.replicas, WAIT_MS)
        elif await _fsyncs_every_write(redis):
            self.barrier = ()
        else:
            self.unconfirmable = (
                "redis.durable_admin_writes: this Redis has no WAITAOF (Redis >= 7.2 or Valkey) and does not "
                "fsync every write (appendonly yes, appendfsync always); set durable_replicas to wait for "
                "replicas instead. Nothing was written."
            )

    def confirmed(self, reply: Any) -> bool:
        """The barrier's reply: WAITAOF [local, replicas] or WAIT replicas."""
        if isinstance(reply, Exception):  # e.g. WAITAOF on a Redis with appendonly no
            return False
        if self.barrier and self.barrier[0] == "WAITAOF":
            return int(reply[0]) >= 1 and int(reply[1]) >= self.replicas
        return int(reply) >= self.replicas

    def refusal(self, reply: Any) -> str:
        where = "on disk" + (f" and on {self.replicas} replica(s)" if self.replicas else "")
        why = f" ({reply})" if isinstance(reply, Exception) else ""
        return (
            f"Redis applied this write but did not confirm it {where} within {WAIT_MS} ms{why}: a Redis crash "
            "now could lose it. Retry with the same idempotency_key (it never applies twice)."
        )


async def _fsyncs_every_write(redis: Redis) -> bool:
    try:
        config = {**await redis.config_get("appendonly"), **await redis.config_get("appendfsync")}
    except redis_errors.ResponseError:  # CONFIG renamed or refused (managed Redis)
        return False
    return config.get("appendonly") == "yes" and config.get("appendfsync") == "always"
