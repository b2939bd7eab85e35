"""Auditing the ledger from outside: `reconcile` proves its invariants, `export` writes it.

Plain Redis reads only (HGETALL, HVALS, SMEMBERS, XRANGE): nothing here decides or
moves money. For every account, from one consistent snapshot of its keys:

    balance  == sum(ledger entry amounts)
    reserved == sum(open reservation amounts)
    balance  == sum(remaining of active and expiring grants) - debt
    held     == sum(remaining of expiring grants)
    each grant: amount == remaining + drawn + expired + voided
    the live set == the grants that are pending, active or expiring
    sum(exact costs) == sum(rounded charges) + carry, with |carry| <= 0.5 micro-USD
    a charge above its reservation is flagged `reservation_exceeded`
    each API key: reserved == sum(its open reservations), spent == sum(its ledger charges)

and for this proxy's data_dir: the settlement journal is empty (every settlement kept
while Redis was away has reached it).

The ledger is append-only, so the snapshot records its last entry id and the sum is
taken up to it in pages: a proxy serving traffic meanwhile cannot cause false drift.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from . import journal, keyspace, views
from .config import Config
from .ledger import iter_entries
from .money import FINE, usd

PAGE = 1000
LIVE_STATUSES = frozenset(("pending", "active", "expiring"))
CSV_COLUMNS = (
    "id",
    "created_at",
    "type",
    "amount_usd",
    "balance_usd",
    "grant_id",
    "request_id",
    "model",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "estimated",
    "downgraded_from",
    "description",
    "price_source",
)


@dataclass(frozen=True, slots=True)
class Drift:
    account_id: str
    check: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.account_id}: {self.check}: expected {self.expected}, found {self.found}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    fields: dict[str, str]
    reservations: list[str]
    grants: list[dict[str, Any]]
    live: set[str]
    last_entry: str | None
    key_counters: dict[str, str]  # lib/keys.lua `kuse`: r:<key id> reserved, u:<key id> spend JSON


async def reconcile(
    redis: Redis, config: Config, accounts: Iterable[str] | None = None, checked: Callable[[], None] | None = None
) -> list[Drift]:
    """Every drift of every account (or of `accounts`); empty when the books balance.
    `checked` is called after each account (a progress bar)."""
    ids = sorted(map(str, await redis.smembers(keyspace.ACCOUNTS))) if accounts is None else list(accounts)
    drifts: list[Drift] = []
    waiting = journal.pending_on_disk(config.data_dir / "journal")
    if waiting:
        drifts.append(Drift("*", "the settlement journal is empty (Redis has every settlement)", "0", str(waiting)))
    for account_id in ids:
        drifts += await check_account(redis, account_id)
        if checked is not None:
            checked()
    return drifts


async def check_account(redis: Redis, account_id: str) -> list[Drift]:
    snap = await _snapshot(redis, account_id)
    if not snap.fields:
        return [Drift(account_id, "account", "an account hash", "none")]
    books = _Books()
    if snap.last_entry is not None:
        async for entry_id, raw in iter_entries(redis, account_id, end=snap.last_entry):
            books.add(entry_id, orjson.loads(raw))
    total = books.total
    balance, reserved, debt, held = (_num(snap.fields, f) for f in ("balance", "reserved", "debt", "held"))
    in_grants = sum(int(g["remaining"]) for g in snap.grants if g["status"] in ("active", "expiring"))
    expiring = sum(int(g["remaining"]) for g in snap.grants if g["status"] == "expiring")
    drifts = [
        _money(account_id, "balance == sum(ledger amounts)", total, balance),
        _money(account_id, "reserved == sum(open reservations)", _reserved(snap.reservations), reserved),
        _money(account_id, "balance == sum(live grant remaining) - debt", in_grants - debt, balance),
        _money(account_id, "held == sum(expiring grant remaining)", expiring, held),
        *(_grant_drift(account_id, g) for g in snap.grants),
        _live_drift(account_id, snap),
        *_carry_drifts(account_id, books, _num(snap.fields, "carry")),
        *(Drift(account_id, "a charge above its reservation is flagged", "flag", i) for i in books.unflagged),
        *_key_drifts(account_id, snap, books),
    ]
    return [d for d in drifts if d is not None]


@dataclass
class _Books:
    """Sums over an account's ledger entries, read once."""

    total: int = 0  # sum of amounts
    exact: int = 0  # sum of exact costs, FINE units
    rounded: int = 0  # sum of rounded charges, micro-USD
    unflagged: list[str] = field(default_factory=list)  # entries above their reservation, no flag
    key_spend: dict[str, int] = field(default_factory=dict)  # API key id -> sum of its charges

    def add(self, entry_id: str, e: dict[str, Any]) -> None:
        amount = int(e["amount"])
        self.total += amount
        if e.get("key_id") and amount:
            self.key_spend[e["key_id"]] = self.key_spend.get(e["key_id"], 0) - amount
        if e.get("exact_micro") is None:
            return
        self.exact += int(e["exact_micro"]) * FINE + int(e.get("exact_fine") or 0)
        self.rounded += -amount - int(e.get("not_returned") or 0)
        first_charge = e.get("reserved") is not None and e.get("previously_charged") is None
        if first_charge and -amount > int(e["reserved"]) and not e.get("reservation_exceeded"):
            self.unflagged.append(entry_id)


def _carry_drifts(account_id: str, books: _Books, carry: int) -> list[Drift]:
    drifts = []
    if books.exact != books.rounded * FINE + carry:
        check = "sum(exact costs) == sum(rounded charges) + carried remainder (in 1e-15 micro-USD)"
        drifts.append(Drift(account_id, check, str(books.exact), str(books.rounded * FINE + carry)))
    if not -FINE // 2 <= carry < FINE // 2:
        drifts.append(
            Drift(account_id, "carried remainder within half a micro-USD", f"|carry| <= {FINE // 2}", str(carry))
        )
    return drifts


def _key_drifts(account_id: str, snap: Snapshot, books: _Books) -> list[Drift]:
    """Each key's counters (lib/keys.lua) against its open reservations and its ledger entries."""
    reserved: dict[str, int] = {}
    for raw in snap.reservations:
        r = orjson.loads(raw)
        if r.get("kr"):
            reserved[r["key"]] = reserved.get(r["key"], 0) + int(r["amount"])
    counters = snap.key_counters
    spent = {name[2:]: int(orjson.loads(raw).get("t") or 0) for name, raw in counters.items() if name[:2] == "u:"}
    held = {name[2:]: int(raw) for name, raw in counters.items() if name[:2] == "r:"}
    drifts = [
        _money(account_id, f"key {k}: reserved == sum(its open reservations)", reserved.get(k, 0), held.get(k, 0))
        for k in sorted(reserved.keys() | held.keys())
    ]
    drifts += [
        _money(account_id, f"key {k}: spent == sum(its ledger charges)", books.key_spend.get(k, 0), spent.get(k, 0))
        for k in sorted(books.key_spend.keys() | spent.keys())
    ]
    return [d for d in drifts if d is not None]


async def _snapshot(redis: Redis, account_id: str) -> Snapshot:
    # one MULTI on one slot: the account's keys as of a single moment (on a Cluster
    # too: redis-py >= 6.2 runs a one-slot MULTI on the slot's node)
    pipe = redis.pipeline(transaction=True)
    pipe.hgetall(keyspace.account(account_id, "acct"))
    pipe.hvals(keyspace.account(account_id, "resv"))
    pipe.hvals(keyspace.account(account_id, "grants"))
    # not pipe.smembers: redis-py's Cluster MULTI (8.1) passes it a `keys` argument its
    # reply callback refuses; the raw command routes by its key just the same
    pipe.execute_command("SMEMBERS", keyspace.account(account_id, "live"))
    pipe.xrevrange(keyspace.account(account_id, "ledger"), "+", "-", count=1)
    pipe.hgetall(keyspace.account(account_id, "kuse"))
    fields, resv, grants, live, last, kuse = await pipe.execute()
    return Snapshot(fields, resv, [orjson.loads(g) for g in grants], set(live), last[0][0] if last else None, kuse)


def _num(fields: dict[str, str], name: str) -> int:
    return int(fields.get(name) or 0)


def _reserved(reservations: list[str]) -> int:
    return sum(int(orjson.loads(raw)["amount"]) for raw in reservations)


def _money(account_id: str, check: str, expected: int, found: int) -> Drift | None:
    return None if expected == found else Drift(account_id, check, usd(expected), usd(found))


def _grant_drift(account_id: str, g: dict[str, Any]) -> Drift | None:
    # `drawn` includes overage debt paid off when the grant was activated
    parts = sum(int(g.get(name) or 0) for name in ("remaining", "drawn", "expired", "voided"))
    check = f"grant {g['id']}: amount == remaining + drawn + expired + voided"
    return _money(account_id, check, int(g["amount"]), parts)


def _live_drift(account_id: str, snap: Snapshot) -> Drift | None:
    expected = {g["id"] for g in snap.grants if g["status"] in LIVE_STATUSES}
    if expected == snap.live:
        return None
    return Drift(account_id, "live set == pending/active/expiring grants", _ids(expected), _ids(snap.live))


def _ids(ids: set[str]) -> str:
    return "{" + ", ".join(sorted(ids)) + "}"


# -- reading and exporting the ledger -------------------------------------------------


async def export(redis: Redis, account_id: str, fmt: str) -> AsyncIterator[str]:
    """The account's whole ledger as CSV (CSV_COLUMNS) or JSON lines (views.entry)."""
    if fmt == "csv":
        yield ",".join(CSV_COLUMNS) + "\r\n"
    chunk: list[str] = []
    async for entry_id, raw in iter_entries(redis, account_id):
        entry = views.entry(account_id, entry_id, raw)
        chunk.append(csv_row(entry) if fmt == "csv" else orjson.dumps(entry).decode() + "\n")
        if len(chunk) >= PAGE:
            yield "".join(chunk)
            chunk = []
    if chunk:
        yield "".join(chunk)


def csv_row(entry: dict[str, Any]) -> str:
    usage = entry.get("usage") or {}
    row = {name: entry.get(name) for name in CSV_COLUMNS}
    row.update({name: usage.get(name) for name in CSV_COLUMNS if name.endswith("_tokens")})
    if entry.get("estimated") is not None:
        row["estimated"] = "true" if entry["estimated"] else "false"
    out = io.StringIO()
    csv.writer(out).writerow(["" if value is None else value for value in row.values()])
    return out.getvalue()
