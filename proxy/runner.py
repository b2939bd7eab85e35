"""Running a Lua script on Redis: one seam, three transports.

`ScriptRunner.run` sends one FCALL or EVALSHA (with or after the reaper's watch pointer, when asked) and
returns the raw reply; `load` loads a script after NOSCRIPT through the same transport,
whose connection has just been shown alive. Every transport raises redis-py's exception
types (resp.py maps its replies with redis-py's own table), so the ledger maps them to
the proxy's errors once (`errors.STORE_DOWN` -> `StoreUnavailable`).

    LeanRunner     the lean RESP client (resp.py): one Redis over TCP or a unix socket;
                   FCALL into the function library where Redis has functions; the watch
                   pointer written by the script itself where it takes one (admit.lua
                   `+watch`): one command, atomic with the reservation
    PoolRunner     redis-py on one Redis: the watch pointer pipelined with the script,
                   and the durability barrier after an admin money write
    ClusterRunner  redis-py on a Cluster: the watch pointer in a round trip of its own
                   (cluster pipelines refuse EVALSHA)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster

from . import keyspace
from .resp import Packed, RespClient
from .scripts import LIBRARY, Script

PACKED_CACHE = 100_000  # (account, model, script keys) whose KEYS stay packed


@dataclass(frozen=True, slots=True)
class Invocation:
    """One script call: the script, whose keys, its context and ARGV after the context."""

    script: Script
    account_id: str
    model: str  # the per-model rate window among the KEYS
    context: bytes
    args: tuple[Any, ...]
    extra_keys: tuple[str, ...] = ()  # KEYS after the account's (settle: its marker)
    watch_due: int | None = None  # also register the account with the reaper (admission)

    def keys(self) -> list[str]:
        return [*keyspace.account_keys(self.account_id, self.model, self.script.keys), *self.extra_keys]

    def watch(self) -> tuple[str, dict[str, int]]:
        """The watch pointer, written before the script where the script cannot write it
        (another slot): a reservation can never exist unseen by the reaper, even if this
        process dies right after."""
        assert self.watch_due is not None
        return keyspace.watch_shard(self.account_id), {self.account_id: self.watch_due}


class ScriptRunner(Protocol):
    async def run(self, call: Invocation) -> Any: ...

    async def load(self, script: Script) -> None: ...


@dataclass
class LeanRunner:
    """FCALL into scripts.LIBRARY where Redis has functions (7.0+, Valkey): the shared
    Lua is loaded once, not run again on every call; EVALSHA on Redis 6.2."""

    client: RespClient
    functions: bool = True  # until Redis says it has none
    _keys: dict[tuple[str, str, tuple[str, ...]], Packed] = field(default_factory=dict)
    _contexts: dict[bytes, Packed] = field(default_factory=dict)

    async def run(self, call: Invocation) -> Any:
        try:
            return await self._run(call)
        except redis_errors.ResponseError as exc:
            if not self.functions:
                raise
            if _library_missing(exc):
                raise redis_errors.NoScriptError(str(exc)) from exc  # the ledger loads, then calls again
            if not _no_functions(exc):
                raise
            self.functions = False  # Redis 6.2, or FCALL not allowed: scripts it is
            return await self._run(call)

    async def _run(self, call: Invocation) -> Any:
        keys = self._packed_keys(call.account_id, call.model, call.script.keys)
        context = self._contexts.get(call.context) or self._pack_context(call.context)
        extra, args = call.extra_keys, call.args
        inside = call.watch_due is not None and "watch" in call.script.extra_keys  # one Redis: the script writes it
        if inside:
            extra, args = (*extra, keyspace.watch_shard(call.account_id)), (*args, call.watch_due)
        command = (
            ("FCALL", call.script.function) if self.functions and call.script.function else ("EVALSHA", call.script.sha)
        )
        script = (*command, keys.arity + len(extra), keys, *extra, context, *args)
        if call.watch_due is None or inside:
            return await self.client.call(*script)
        shard, member = call.watch()
        (account_id, due), *_ = member.items()
        _, result = await self.client.pipeline(("ZADD", shard, "LT", due, account_id), script)
        if isinstance(result, Exception):
            raise result
        return result

    async def load(self, script: Script) -> None:
        if self.functions and script.function:
            try:
                await self.client.call("FUNCTION", "LOAD", LIBRARY)
                return
            except redis_errors.ResponseError as exc:
                if "already exists" in str(exc):  # another instance loaded it first
                    return
                self.functions = False  # functions refused (an ACL, a managed Redis): scripts it is
        await self.client.call("SCRIPT", "LOAD", script.source)

    def _packed_keys(self, account_id: str, model: str, names: tuple[str, ...]) -> Packed:
        """A script's KEYS for an (account, model), packed once (resp.Packed)."""
        packed = self._keys.get((account_id, model, names))
        if packed is None:
            if len(self._keys) >= PACKED_CACHE:
                self._keys.clear()
            packed = Packed(*keyspace.account_keys(account_id, model, names))
            self._keys[(account_id, model, names)] = packed
        return packed

    def _pack_context(self, context: bytes) -> Packed:
        if len(self._contexts) >= 1024:  # one per config and model: a reload leaves the old ones
            self._contexts.clear()
        packed = self._contexts[context] = Packed(context)
        return packed


@dataclass
class PoolRunner:
    redis: Redis

    async def run(self, call: Invocation) -> Any:
        keys = call.keys()
        script = (call.script.sha, len(keys), *keys, call.context, *call.args)
        if call.watch_due is None:
            return await self.redis.evalsha(*script)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(*call.watch(), lt=True)
        pipe.evalsha(*script)
        _, result = await pipe.execute(raise_on_error=False)
        if isinstance(result, Exception):
            raise result
        return result

    async def run_with_barrier(self, call: Invocation, barrier: tuple[Any, ...]) -> tuple[Any, Any]:
        """The script, then `INCR` + `barrier` (WAITAOF / WAIT) on the same connection
        (durability.py): the reply and the barrier's reply (None without a barrier)."""
        keys = call.keys()
        pipe = self.redis.pipeline(transaction=False)
        pipe.evalsha(call.script.sha, len(keys), *keys, call.context, *call.args)
        if barrier:
            pipe.incr(keyspace.DURABLE_BARRIER)
            pipe.execute_command(*barrier)
        result, *rest = await pipe.execute(raise_on_error=False)
        if isinstance(result, Exception):
            raise result
        return result, (rest[-1] if rest else None)

    async def load(self, script: Script) -> None:
        await self.redis.script_load(script.source)


@dataclass
class ClusterRunner:
    redis: RedisCluster

    async def run(self, call: Invocation) -> Any:
        if call.watch_due is not None:
            await self.redis.zadd(*call.watch(), lt=True)
        keys = call.keys()
        return await self.redis.evalsha(call.script.sha, len(keys), *keys, call.context, *call.args)

    async def load(self, script: Script) -> None:
        await self.redis.script_load(script.source)


def _library_missing(exc: Exception) -> bool:
    """FCALL found no such function: the library is not loaded (a restart, FUNCTION FLUSH)."""
    return "function not found" in str(exc).lower()


def _no_functions(exc: Exception) -> bool:
    """FCALL itself refused: Redis 6.2 has no functions, or an ACL does not allow them."""
    text = str(exc).lower()
    return "fcall" in text and ("unknown command" in text or "noperm" in text)


def runner_for(redis: Redis, fast: RespClient | None) -> ScriptRunner:
    if fast is not None:
        return LeanRunner(fast)
    if isinstance(redis, RedisCluster):
        return ClusterRunner(redis)
    return PoolRunner(redis)
