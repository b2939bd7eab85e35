"""The settlement journal: settlements that could not reach Redis, kept on local disk
until Redis takes them, however long the outage lasts.

Each proxy appends to its own file under `data_dir/journal/` (one JSON line per
settlement, fsynced before the settlement counts as kept) and holds an exclusive lock
on it while it runs. At start a proxy also takes over the files of proxies that died
(their lock is free) and replays them. Replay is idempotent: settle.lua remembers
every settled request id, so a settlement that did reach Redis before its reply was
lost is not charged twice.

It also remembers, in memory, the settlements Redis acknowledged in the last few
seconds: a Redis that restarts from an `appendfsync everysec` AOF, or a replica promoted
in a failover, may have lost them. When the worker sees a new Redis server (its run id
changed), they are settled again: the ones Redis still has are duplicates, the lost ones
are charged (their reservations may be lost too: then they are charged `unreserved`).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

import orjson
import structlog

from . import errors, metrics
from .ledger import SettleCall

log = structlog.get_logger("proxy.journal")
MAX_RECORDS = 1_000_000  # ~0.5 GB: far more than the requests in flight when Redis went away
RECENT_S = 5.0  # an everysec AOF loses at most ~2 s of writes; the worker looks every second


class JournalFull(Exception):
    """The journal holds MAX_RECORDS settlements: the caller keeps retrying Redis itself."""


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / f"settlements-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self.pending: dict[str, SettleCall] = {}  # request id -> settlement not yet in Redis
        self._file: IO[bytes] | None = None
        self._orphans: list[tuple[Path, IO[bytes]]] = []  # dead proxies' files, locked by us
        self._lock = asyncio.Lock()
        self._recent: deque[tuple[float, SettleCall]] = deque()  # acknowledged in the last RECENT_S

    def open(self) -> None:
        """Create our file and take over the files of proxies that are gone."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for path in sorted(self.directory.glob("settlements-*.jsonl")):
            if path != self.path:
                self._adopt(path)

    def _adopt(self, path: Path) -> None:
        handle = path.open("rb")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live proxy's journal
            handle.close()
            return
        calls = [call for line in handle.read().splitlines() if (call := _parse(line, path)) is not None]
        if not calls:  # a clean file of a proxy that was killed idle
            path.unlink(missing_ok=True)
            handle.close()
            return
        self.pending.update((call.request_id, call) for call in calls)
        self._orphans.append((path, handle))
        log.warning("journal_adopted", path=str(path), settlements=len(calls))

    def __len__(self) -> int:
        return len(self.pending)

    def holds(self, account_id: str) -> list[str]:
        """Request ids of the account's journaled settlements (the reaper spares them)."""
        return [c.request_id for c in self.pending.values() if c.account_id == account_id]

    async def append(self, call: SettleCall) -> None:
        """Keep a settlement on disk (fsynced) until `replay` applies it."""
        if len(self.pending) >= MAX_RECORDS:
            raise JournalFull(f"the settlement journal holds {MAX_RECORDS} settlements")
        line = orjson.dumps(call.to_record()) + b"\n"
        async with self._lock:
            await asyncio.to_thread(self._write, line)
            self.pending[call.request_id] = call
        metrics.SETTLEMENTS_JOURNALED.inc()
        metrics.JOURNAL_PENDING.set(len(self.pending))

    def _write(self, line: bytes) -> None:
        assert self._file is not None, "Journal.open() was not called"
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    def remember(self, call: SettleCall) -> None:
        """A settlement Redis acknowledged: kept in memory for RECENT_S seconds."""
        now = time.monotonic()
        self._recent.append((now, call))
        while self._recent and self._recent[0][0] < now - RECENT_S:
            self._recent.popleft()

    async def requeue_recent(self) -> int:
        """Redis may have lost what it acknowledged lately: journal it to be settled again."""
        calls = [call for _, call in self._recent]
        self._recent.clear()
        for call in calls:
            if call.request_id not in self.pending:
                await self.append(call)
        return len(calls)

    async def replay(self, settle: Callable[[SettleCall], Awaitable[object]]) -> bool:
        """Apply journaled settlements; True when Redis took every one it could (False:
        it is away again). A settlement Redis refuses for another reason stays journaled,
        logged, and does not hold up the others."""
        if not self.pending:
            return True
        applied, store_up = 0, True
        for call in list(self.pending.values()):
            try:
                await settle(call)
            except errors.StoreUnavailable:
                store_up = False
                break
            except Exception:  # a bug, not an outage: keep it for an operator, go on
                log.exception("journal_replay_failed", request_id=call.request_id, account_id=call.account_id)
                continue
            del self.pending[call.request_id]
            applied += 1
        metrics.JOURNAL_PENDING.set(len(self.pending))
        if applied:
            async with self._lock:
                await asyncio.to_thread(self._compact)
            log.info("journal_replayed", settlements=applied, left=len(self.pending))
        return store_up

    def _compact(self) -> None:
        """Rewrite our file with what is still pending (atomically) and drop the orphans."""
        assert self._file is not None
        scratch = self.path.with_suffix(".tmp")
        fresh = scratch.open("wb")
        fcntl.flock(fresh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked before it takes our name
        fresh.writelines(orjson.dumps(c.to_record()) + b"\n" for c in self.pending.values())
        fresh.flush()
        os.fsync(fresh.fileno())
        os.replace(scratch, self.path)
        self._file.close()
        self._file = fresh
        _fsync_dir(self.directory)
        for path, handle in self._orphans:  # their settlements are applied or in our file now
            path.unlink(missing_ok=True)
            handle.close()
        self._orphans = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            if not self.pending:
                self.path.unlink(missing_ok=True)


def _parse(line: bytes, path: Path) -> SettleCall | None:
    if not line.strip():
        return None
    try:
        return SettleCall.from_record(orjson.loads(line))
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        # a torn last line (killed mid-write) was never kept: its reservation is left to
        # the reaper, which charges the request's last checkpoint
        log.error("journal_line_unreadable", path=str(path), line=line[:200].decode(errors="replace"))
        return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pending_on_disk(directory: Path) -> int:
    """Settlements in every journal file under `directory` (for reconcile)."""
    if not directory.is_dir():
        return 0
    return sum(
        sum(1 for line in path.read_bytes().splitlines() if line.strip())
        for path in directory.glob("settlements-*.jsonl")
    )
