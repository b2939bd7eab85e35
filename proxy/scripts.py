"""The contract between Python and the Lua scripts in `lua/`: how a script is built, the
context every script reads, and every reply as a typed value.

A script is the shared library `lua/lib/*.lua` (in LIB order: each file uses only what
the ones before it define) followed by `lua/<name>.lua`, sent to Redis as one source.
`Script.describe` turns the line numbers in a Redis error back into file:line, so a Lua
error names its real place. A script's header states its replies, one line per kind:

    -- reply ok: reserved balance available tier ...

and `Script.decode` maps a reply onto those names (checking its length); every reply
ends with `events`, the number of webhook events it raised. The typed values below
(Admission, Settlement, AccountView, Reaped, Lookup, KeyFigures) are built from those names, here and only
here: nothing else indexes into a script's reply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson

from . import errors
from .config import Config
from .money import FINE, MAX_MICRO, UNLIMITED_MICRO, dollars, to_micro, usd
from .ratelimits import RateFigures, go_duration, retry_headers
from .views import rfc3339

LIB = ("base", "account", "calendar", "plans", "grants", "keys", "charges", "events", "tiers", "windows", "call")
ACCOUNT_SCRIPTS = (
    "admit", "settle", "grant", "void", "reap", "touch", "account", "extend", "adjust", "generation", "key", "keyinfo",
)  # fmt: skip
SETTLED_TTL_MS = 30 * 86_400_000  # a settled request id is remembered (duplicates) this long
_REPLY = re.compile(r"^-- reply(?: (\w+))?:(.*)$", re.MULTILINE)
_KEYS = re.compile(r"^-- keys:(.*)$", re.MULTILINE)
_LUA_LINE = re.compile(r"user_(script|function):(\d+)")


@dataclass(frozen=True, slots=True)
class Reply:
    code: str | None  # the reply's kind ('ok', 'insufficient', ...); None for scripts with one kind
    values: dict[str, Any]  # by the names in the script's header
    events: int  # webhook events the call raised


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str
    parts: tuple[tuple[int, str], ...]  # (first line in `source`, file it came from)
    replies: dict[str | None, tuple[str, ...]]  # reply kind -> value names
    keys: tuple[str, ...] = ()  # the account's keys it takes, by name (keyspace.account_keys)
    extra_keys: tuple[str, ...] = ()  # keys the caller adds for the call (`+name`: settle's marker)
    function: str = ""  # its name in LIBRARY (FCALL); "" for a script outside it
    library_parts: tuple[tuple[int, str], ...] = ()  # as `parts`, in LIBRARY's source

    def decode(self, raw: list[Any]) -> Reply:
        code = str(raw[0]) if None not in self.replies else None
        names = self.replies.get(code)
        values = raw[1:-1] if code is not None else raw[:-1]
        if names is None or len(values) != len(names):
            raise ValueError(f"{self.name}.lua replied {raw[:1]} with {len(values)} values, not as its header says")
        return Reply(code, dict(zip(names, values, strict=True)), int(raw[-1]))

    def describe(self, message: str) -> str:
        """A Redis error about this script with each `user_script:N` (run as a script) or
        `user_function:N` (run from LIBRARY) as file:line."""
        return _LUA_LINE.sub(
            lambda m: self.locate(int(m.group(2)), self.parts if m.group(1) == "script" else self.library_parts),
            message,
        )

    def locate(self, line: int, parts: tuple[tuple[int, str], ...] | None = None) -> str:
        chosen = self.parts if parts is None else parts
        start, path = max((p for p in chosen if p[0] <= line), default=(1, f"{self.name}.lua"))
        return f"lua/{path}:{line - start + 1}"


def _lib_texts() -> list[tuple[str, str]]:
    lua = resources.files("proxy") / "lua"
    texts = [("local K\n", "(K: set by begin_call)")]
    return texts + [((lua / f"lib/{part}.lua").read_text().rstrip("\n") + "\n", f"lib/{part}.lua") for part in LIB]


def _parts(texts: list[tuple[str, str]], line: int = 1) -> tuple[tuple[int, str], ...]:
    parts = []
    for text, path in texts:
        parts.append((line, path))
        line += text.count("\n")
    return tuple(parts)


def _load(name: str, lib: bool = True) -> Script:
    lua = resources.files("proxy") / "lua"
    own = (lua / f"{name}.lua").read_text().rstrip("\n") + "\n"
    declared = _KEYS.search(own)
    names = tuple(declared.group(1).split()) if declared else ()
    keys = tuple(n for n in names if not n.startswith("+"))
    extra = tuple(n[1:] for n in names if n.startswith("+"))
    texts = [*_lib_texts(), (_begin((*keys, *extra)), "(KEYS, from the script's `-- keys:` line)")] if lib else []
    texts.append((own, f"{name}.lua"))
    source = "".join(text for text, _ in texts)
    replies = {m.group(1): tuple(m.group(2).split()) for m in _REPLY.finditer(own)}
    sha = hashlib.sha1(source.encode()).hexdigest()
    return Script(name, source, sha, _parts(texts), replies, keys, extra)


def _begin(names: tuple[str, ...]) -> str:
    """The call's start: `K`, its KEYS by name (any other name is an error, never a nil
    key), and the rest of its state (lib/call.lua)."""
    fields = ", ".join(f"{n} = KEYS[{i}]" for i, n in enumerate(names, 1))
    return f"begin_call(setmetatable({{{fields}}}, UNDECLARED), ARGV)\n"


def _library(scripts: dict[str, Script]) -> tuple[str, dict[str, Script]]:
    """Every account script as one Redis function library (FCALL): the shared code runs
    once when loaded instead of on every call. Named by its content, so instances
    running different releases each find their own."""
    shared = _lib_texts()
    skip = len("".join(text for text, _ in shared))
    texts = list(shared)
    for script in scripts.values():
        texts.append((f"redis.register_function('{script.name}_@', function(KEYS, ARGV)\n", f"{script.name}.lua"))
        texts.append((script.source[skip:], f"{script.name}.lua"))  # its KEYS line, then its body
        texts.append(("end)\n", f"{script.name}.lua"))
    body = "".join(text for text, _ in texts)
    digest = hashlib.sha1(body.encode()).hexdigest()[:16]
    source = f"#!lua name=metering_{digest}\n" + body.replace("_@', function(KEYS", f"_{digest}', function(KEYS")
    parts = _parts(texts, line=2)
    named = {}
    for name, script in scripts.items():
        begin = next(line for line, path in parts if path == f"{name}.lua") + 1  # after its register line
        own = (*parts[: len(shared)], (begin, "(KEYS, from the script's `-- keys:` line)"), (begin + 1, f"{name}.lua"))
        named[name] = dataclasses.replace(script, function=f"{name}_{digest}", library_parts=own)
    return source, named


LIBRARY, _IN_LIBRARY = _library({name: _load(name) for name in ACCOUNT_SCRIPTS})
SCRIPTS = _IN_LIBRARY | {"watch": _load("watch", lib=False)}


# -- the context: ARGV[1] of every account script ------------------------------------


def tier_table(config: Config) -> bytes:
    """The rate tiers as they decide an account's tier: what a tier generation names."""
    return orjson.dumps(config.rate_tiers.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)


def context(config: Config, model: str | None = None, tier_generation: int = 0) -> bytes:
    """The config the scripts read (lua/lib/base.lua `CTX`), encoded once per config and model."""
    tiers = []
    for tier in config.rate_tiers.tiers:
        limits = tier.models.get(model) if model else None
        tiers.append(
            {
                "name": tier.name,
                "min": to_micro(tier.min_usd),
                "days": tier.min_days_since_first_payment,
                "rpm": tier.rpm,
                "tpm": tier.tpm,
                "model_rpm": limits.rpm if limits else 0,
                "model_tpm": limits.tpm if limits else 0,
            }
        )
    plans = {}
    for name, plan in config.plans.items():
        overage = plan.overage
        room = 0 if overage is None else UNLIMITED_MICRO if overage.limit_usd is None else to_micro(overage.limit_usd)
        plans[name] = {
            "allocation": to_micro(plan.allocation.amount_usd) if plan.allocation else 0,
            "every": plan.allocation.every if plan.allocation else "month",
            "overage": room,  # no overage section: none; limit null: unlimited
            "invoice_every": to_micro(overage.invoice_every_usd) if overage and overage.invoice_every_usd else 0,
            "downgrade_to": plan.on_exhausted.downgrade_to if plan.on_exhausted else "",
        }
    hooks = config.webhooks
    return orjson.dumps(
        {
            "tiers": orjson.dumps(tiers).decode(),  # decoded by the scripts only when needed
            "basis": config.rate_tiers.basis,
            "plans": orjson.dumps(plans or {"": {}}).decode(),  # cjson: {} would decode as an array
            "thresholds": [to_micro(t) for t in hooks.low_balance_thresholds_usd] if hooks else [],
            "webhooks": hooks is not None,
            "topup_cooldown_ms": hooks.auto_topup_cooldown_s * 1000 if hooks else 0,
            "ttl_ms": config.billing.reservation_ttl_s * 1000,
            "mode": config.billing.on_insufficient,
            "fine": FINE,
            "settled_ttl_ms": SETTLED_TTL_MS,
            "tier_generation": tier_generation,
            "max_exact": MAX_MICRO,
            "unlimited": UNLIMITED_MICRO,
        }
    )


# -- replies as typed values ----------------------------------------------------------


def rate_figures(values: dict[str, Any]) -> RateFigures:
    names = ("rpm", "rpm_left", "rpm_reset_ms", "tpm", "tpm_left", "tpm_reset_ms")
    return RateFigures(*(int(values[n]) for n in names))


@dataclass(frozen=True, slots=True)
class Admission:
    reserved: int
    balance: int
    available: int
    tier: str
    rate: RateFigures
    clamp_tokens: int  # 0: max tokens unchanged
    downgrade_to: str  # '': served as asked


def admission(reply: Reply, model: str) -> Admission:
    """admit.lua's reply: an Admission, or the ProxyError that refuses the request."""
    v = reply.values
    if reply.code == "ok":
        return Admission(
            int(v["reserved"]),
            int(v["balance"]),
            int(v["available"]),
            str(v["tier"]),
            rate_figures(v),
            int(v["clamp"]),
            str(v["downgrade_to"]),
        )
    if reply.code in ("no_account", "revoked"):
        raise errors.InvalidApiKey("Incorrect API key provided: the key was revoked or its account is gone.")
    if reply.code == "expired":
        raise _expired(v)
    if reply.code == "model_not_allowed":
        raise errors.model_not_allowed(model)
    if reply.code == "key_limit":
        raise _key_limit(v)
    if reply.code == "suspended":
        raise errors.PermissionDenied("This account is suspended.", code="account_suspended")
    if reply.code == "replayed":  # reserved by a first attempt whose reply was lost: the reaper releases it
        raise errors.StoreUnavailable("The metering store did not answer in time; nothing was charged.")
    if reply.code == "insufficient":
        raise errors.InsufficientQuota(
            "You exceeded your current quota, please check your plan and billing details. "
            f"This request needs up to ${usd(int(v['needed']))}; ${usd(max(int(v['available']), 0))} is available.",
            headers=rate_figures(v).headers(),
        )
    raise _rate_limited(reply, model)


def _expired(v: dict[str, Any]) -> errors.InvalidApiKey:
    return errors.InvalidApiKey(f"Incorrect API key provided: the key expired at {rfc3339(int(v['expires_at']))}.")


PERIOD_NAMES = {"daily": "day", "weekly": "week", "monthly": "month"}


def _key_limit(v: dict[str, Any]) -> errors.InsufficientQuota:
    """The key's spend limit, not the balance, refuses the request: say which and when it resets."""
    limit, spent, reserved, needed = (int(v[n]) for n in ("limit", "spent", "reserved", "needed"))
    reset = str(v["reset"])
    which = f"{reset} limit" if reset else "limit (all time)"
    where = f"this {PERIOD_NAMES[reset]}" if reset else "in total"
    when = f"It resets at {rfc3339(int(v['resets_at']))}." if reset else "It never resets."
    return errors.InsufficientQuota(
        f"This API key reached its {which} of ${dollars(limit)}: ${dollars(spent)} spent and "
        f"${dollars(reserved)} reserved {where}; this request needs up to ${dollars(needed)}. {when}",
        code="key_limit_exceeded",
        headers=rate_figures(v).headers(),
    )


def _rate_limited(reply: Reply, model: str) -> errors.RateLimited:
    v = reply.values
    code = str(reply.code)
    kind = "requests" if code.endswith("rate_requests") else "tokens"
    limit, used, requested, retry_ms = (int(v[n]) for n in ("limit", "used", "requested", "retry_ms"))
    unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
    scope = "this API key's limit" if code.startswith("key_") else f"tier {v['tier']}"
    rate = rate_figures(v)
    if requested > limit:  # can never fit: tell the SDK not to retry, as OpenAI does
        return errors.RateLimited(
            f"Request too large for {model} on {unit} ({scope}): Limit {limit}, Requested {requested}. "
            "The input or output tokens must be reduced in order to run successfully.",
            type=kind,
            headers={**rate.headers(), "x-should-retry": "false"},
        )
    return errors.RateLimited(
        f"Rate limit reached for {model} on {unit} ({scope}): Limit {limit}, Used {used}, "
        f"Requested {requested}. Please try again in {go_duration(retry_ms)}.",
        type=kind,
        headers={**rate.headers(), **retry_headers(retry_ms)},
    )


@dataclass(frozen=True, slots=True)
class Settlement:
    cost: int  # what this settlement charged (micro-USD)
    balance: int
    ledger_id: str
    duplicate: bool = False
    reserved: int | None = None  # the reservation it closed; None: Redis knew none (lost)

    @property
    def exceeded(self) -> bool:
        """Charged above its reservation: the upstream wrote past the cap it was sent."""
        return self.reserved is not None and self.cost > self.reserved

    @property
    def unreserved(self) -> bool:
        return not self.duplicate and self.reserved is None


def settlement(reply: Reply) -> Settlement:
    v = reply.values
    if reply.code == "duplicate":
        return Settlement(0, 0, str(v["ledger_id"]), duplicate=True)
    reserved = int(v["reserved"])
    return Settlement(
        int(v["charged"]), int(v["balance"]), str(v["ledger_id"]), reserved=None if reserved < 0 else reserved
    )


@dataclass(frozen=True, slots=True)
class AccountView:
    """An account as the touch script returns it (raw Redis fields, micro-USD)."""

    fields: dict[str, str]
    grants: list[dict[str, Any]]
    rpm: int
    tpm: int
    overage_room: int

    def num(self, name: str) -> int:
        return int(self.fields.get(name) or 0)

    @property
    def balance(self) -> int:
        return self.num("balance")

    @property
    def reserved(self) -> int:
        return self.num("reserved")

    @property
    def available(self) -> int:
        return self.balance - self.reserved - self.num("held") + self.overage_room


def account_view(reply: Reply, account_id: str) -> AccountView:
    v = reply.values
    if reply.code == "no_account":
        raise errors.NotFound(f"No account {account_id!r}.")
    if reply.code == "revoked":
        raise errors.InvalidApiKey("Incorrect API key provided: the key was revoked.")
    if reply.code == "expired":
        raise _expired(v)
    grants = [orjson.loads(g) for g in v["grants"]]
    return AccountView(pairs(v["fields"]), grants, int(v["rpm"]), int(v["tpm"]), int(v["overage_room"]))


@dataclass(frozen=True, slots=True)
class Reaped:
    closed: int  # reservations closed: charged at their checkpoint or released
    next_expiry_ms: int  # the earliest remaining expiry, 0 = none
    outbox: int  # webhook events waiting


def reaped(reply: Reply) -> Reaped:
    v = reply.values
    return Reaped(int(v["closed"]), int(v["next_expiry_ms"]), int(v["outbox"]))


@dataclass(frozen=True, slots=True)
class Lookup:
    """Where Redis knows a request from (generation.lua): `settled` (its ledger entry),
    `open` (its reservation) or `reaped` (its reservation, closed by the reaper)."""

    found: str
    record: dict[str, Any]  # the ledger entry or the reservation, as the scripts wrote it
    ledger_id: str | None = None


def lookup(reply: Reply, account_id: str, request_id: str) -> Lookup:
    """generation.lua's reply; an unknown request is the same 404 whoever asks."""
    v = reply.values
    if reply.code == "no_account":
        raise errors.NotFound(f"No account {account_id!r}.")
    if reply.code == "unknown":
        raise errors.NotFound(f"No generation with id {request_id!r}.", param="id")
    if reply.code == "settled":
        return Lookup("settled", orjson.loads(v["entry"]), str(v["ledger_id"]))
    return Lookup(str(reply.code), orjson.loads(v["reservation"]))


@dataclass(frozen=True, slots=True)
class KeyFigures:
    """An API key as keyinfo.lua reads it: status, settings (the `kset` JSON of
    lib/keys.lua) and spend (micro-USD) from the counters settlement keeps."""

    key_id: str
    status: str  # active | revoked | '' (no such key)
    settings: dict[str, Any]
    reserved: int  # by the key's open requests
    spend: dict[str, int]  # total, day, week, month (the current UTC periods)
    limit_spent: int  # what the limit counts: the spend of its period, else of all time
    room: int | None  # what may still be reserved under the limit, as admission reckons it (None: no limit)
    resets_at: int  # ms: the end of the limit's period; 0 = never
    expired: bool

    @property
    def limit(self) -> int | None:
        raw = self.settings.get("limit")
        return None if raw is None else int(raw)

    @property
    def remaining(self) -> int | None:
        """What a new request may still reserve under the limit (None: no limit)."""
        return None if self.room is None else max(0, self.room)

    @property
    def allowed_models(self) -> list[str] | None:
        raw = self.settings.get("models")
        return None if raw is None else list(orjson.loads(raw))

    def allows(self, model: str) -> bool:
        allowed = self.allowed_models
        return allowed is None or model in allowed

    def usable(self) -> None:
        """Raise the 401 a request with this key gets, if any."""
        if self.status != "active":
            raise errors.InvalidApiKey("Incorrect API key provided: the key was revoked.")
        if self.expired:
            raise _expired({"expires_at": self.settings["exp"]})


def key_figures(reply: Reply) -> list[KeyFigures]:
    out = []
    for raw in reply.values["keys"]:
        v = orjson.loads(raw)
        spend = {name: int(v[name]) for name in ("total", "day", "week", "month")}
        settings = orjson.loads(v["settings"])
        room = int(v["room"]) if v["room"] != "" else None
        figures = KeyFigures(
            v["id"], v["status"], settings, int(v["reserved"]), spend, int(v["limit_spent"]), room,
            int(v["resets_at"]), v["expired"],
        )  # fmt: skip
        out.append(figures)
    return out


def pairs(flat: list[str]) -> dict[str, str]:
    """A flat HGETALL reply as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
