"""Admin request models: one definition validates HTTP bodies, query strings and CLI
flags alike, and generates the admin OpenAPI document, so none of them can drift.

Amounts arrive as decimal strings (or JSON numbers, which `loads` keeps as `Decimal`)
and leave validation as exact integers of micro-USD; times arrive as RFC 3339 and
leave as integer milliseconds. Every model forbids unknown fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from . import errors, keyspace, views
from .money import LossyAmount, to_micro

M = TypeVar("M", bound=BaseModel)

MAX_USD = "9007199254.740991"  # 2^53 - 1 micro-USD: what a Lua double holds exactly
_DIGITS = r"[0-9]+(\.[0-9]{1,6}0*)?"  # at most 6 significant decimals


def usd_schema(sign: str = "", minimum: dict[str, int] | None = None, nonzero: bool = False) -> dict[str, Any]:
    """What `_micro` accepts, as JSON Schema: a plain decimal string or a JSON number."""
    lookahead = "(?=[^1-9]*[1-9])" if nonzero else ""
    return {
        "type": ["string", "number"],
        "pattern": rf"^\s*{lookahead}{sign}{_DIGITS}\s*$",
        **(minimum or {}),
        "maximum": float(MAX_USD),
        "description": "USD as a decimal string (or JSON number), at most 6 decimal places",
        "examples": ["12.500000"],
    }


USD_SCHEMA = usd_schema("-?")
TIME_SCHEMA = {"type": "string", "format": "date-time", "examples": ["2030-01-01T00:00:00Z"]}


_PLAIN_DECIMAL = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")


def _micro(value: Any) -> int:
    # JSON numbers arrive as Decimal (schemas.loads); a float never becomes money
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise ValueError('must be a decimal amount in USD, such as "12.50"')
    if isinstance(value, str) and not _PLAIN_DECIMAL.match(value.strip()):
        # Decimal() also takes "1_000", "1e3" and non-ASCII digits: a typo must not be money
        raise ValueError('must be a plain decimal amount in USD, such as "12.50"')
    try:
        return to_micro(value.strip() if isinstance(value, str) else value)
    except LossyAmount as exc:
        raise ValueError(str(exc)) from None


def _not_negative(micro: int) -> int:
    if micro < 0:
        raise ValueError("must not be negative")
    return micro


def _positive(micro: int) -> int:
    if micro <= 0:
        raise ValueError("must be greater than zero")
    return micro


def _time(value: Any) -> int:
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 time string, such as 2030-01-01T00:00:00Z")
    try:
        ms = views.parse_time(value)
    except ValueError:
        raise ValueError("must be an RFC 3339 time string, such as 2030-01-01T00:00:00Z") from None
    if ms is None:
        raise ValueError("must not be empty")
    if ms <= 0:  # 0 means "now" / "never" to the scripts
        raise ValueError("must be after 1970-01-01T00:00:00Z")
    return ms


def _decimal_text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise ValueError("must be a decimal string")
    if isinstance(value, str) and not _PLAIN_DECIMAL.match(value.strip()):
        raise ValueError('must be a plain decimal string, such as "0.9"')
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise ValueError("must be a decimal string") from None
    if not number.is_finite() or number < 0:
        raise ValueError("must be a non-negative decimal")
    return format(number, "f")  # "1E+2" -> "100"


def _plain_json(value: Any) -> Any:
    """Metadata is not money: JSON numbers parsed as Decimal go back to plain numbers."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    return value


def _small_json(value: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(value)) > 16_384:
        raise ValueError("must serialize to at most 16 KiB of JSON")
    return value


Usd = Annotated[int, BeforeValidator(_micro), WithJsonSchema(USD_SCHEMA)]
NonNegativeUsd = Annotated[Usd, AfterValidator(_not_negative), WithJsonSchema(usd_schema(minimum={"minimum": 0}))]
PositiveUsd = Annotated[
    Usd, AfterValidator(_positive), WithJsonSchema(usd_schema(minimum={"exclusiveMinimum": 0}, nonzero=True))
]
Time = Annotated[int, BeforeValidator(_time), WithJsonSchema(TIME_SCHEMA)]
DecimalText = Annotated[
    str,
    BeforeValidator(_decimal_text),
    WithJsonSchema(
        {"type": ["string", "number"], "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*$", "minimum": 0, "examples": ["0.9"]}
    ),
]
Metadata = Annotated[dict[str, Any], BeforeValidator(_plain_json), AfterValidator(_small_json)]
PositiveInt = Annotated[int, Field(ge=1, le=2**31, strict=True)]  # strict: true is not 1
AccountId = Annotated[str, Field(pattern=keyspace.ACCOUNT_ID.pattern)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RateLimits(_Request):
    """Requests and tokens per rolling minute: an account's override of its tier's limits,
    or an API key's own limits below its account's; a null field clears that limit."""

    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None


class AutoTopup(_Request):
    """Below `threshold_usd`, request `amount_usd`, or enough to reach `target_usd`."""

    threshold_usd: NonNegativeUsd
    amount_usd: PositiveUsd | None = None
    target_usd: PositiveUsd | None = None

    @model_validator(mode="after")
    def _one_amount(self) -> AutoTopup:
        if (self.amount_usd is None) == (self.target_usd is None):
            raise ValueError("give exactly one of amount_usd and target_usd")
        if self.target_usd is not None and self.target_usd <= self.threshold_usd:
            raise ValueError("target_usd must be above threshold_usd")
        return self


class AccountPatch(_Request):
    """Only the fields given change; null clears a field (falls back to plan or config)."""

    plan: str | None = None
    overage_limit_usd: Literal["unlimited"] | NonNegativeUsd | None = None
    auto_topup: AutoTopup | None = None
    rate_limits: RateLimits | None = None
    status: Literal["active", "suspended"] | None = None
    metadata: Metadata | None = None
    low_balance_thresholds_usd: Annotated[list[NonNegativeUsd], Field(max_length=20)] | None = None

    @model_validator(mode="after")
    def _status_not_null(self) -> AccountPatch:
        if "status" in self.model_fields_set and self.status is None:
            raise ValueError("status cannot be null: use active or suspended")
        return self


class AccountCreate(AccountPatch):
    """An absent `plan` means `default_plan` from the config; an explicit null, no plan."""

    id: AccountId


class KeyPatch(_Request):
    """An API key's settings. Only the fields given change; null clears a field (every
    model, no spend limit, a limit that never resets, never expires, the account's rate
    limits). `allowed_models` must be configured models."""

    name: Annotated[str | None, Field(max_length=200)] = None
    allowed_models: Annotated[
        list[str] | None, Field(max_length=1000, description="Configured models the key may use; null: every model")
    ] = None
    limit_usd: Annotated[
        NonNegativeUsd | None,
        Field(description="The most the key may spend in a period, its open reservations included; null: no limit"),
    ] = None
    limit_reset: Annotated[
        Literal["daily", "weekly", "monthly"] | None,
        Field(description="The limit's period: UTC calendar days, weeks from Monday, months; null: it never resets"),
    ] = None
    expires_at: Annotated[
        Time | None, Field(description="When the key stops working (401); null: never. A past time expires it at once")
    ] = None
    rate_limits: Annotated[
        RateLimits | None, Field(description="The key's own limits, below its account's; null: the account's apply")
    ] = None


class KeyCreate(KeyPatch):
    """A new API key (shown once); `expires_at` must be in the future."""

    name: Annotated[str, Field(max_length=200)] = ""


class GrantCreate(_Request):
    amount_usd: PositiveUsd
    kind: Literal["paid", "promotional"]
    priority: Annotated[int, Field(ge=-1_000_000, le=1_000_000, strict=True)] = 0  # lower is drawn first
    effective_at: Time | None = None  # null: now
    expires_at: Time | None = None  # null: never
    description: Annotated[str, Field(max_length=1000)] | None = None
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    per_unit_cost_basis: DecimalText | None = None  # what one USD of credit cost the buyer


class AdjustmentCreate(_Request):
    """Positive: settles overage debt (at most the debt). Negative: a manual charge."""

    amount_usd: Usd
    description: Annotated[str, Field(min_length=1, max_length=1000)]
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255)] | None = None

    @model_validator(mode="after")
    def _not_zero(self) -> AdjustmentCreate:
        if self.amount_usd == 0:
            raise ValueError("amount_usd must not be zero")
        return self


class GrantVoid(_Request):
    reason: Annotated[str, Field(max_length=1000)] = ""


CURSOR = r"^\d{1,19}-\d{1,19}$"  # a stream id: two numbers that fit 64 bits
Cursor = Annotated[str, Field(pattern=CURSOR)]


class LedgerQuery(_Request):
    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    cursor: Cursor | None = None  # the previous page's next_cursor
    order: Literal["asc", "desc"] = "asc"  # desc: newest first (the most recent page first)


class GenerationsQuery(_Request):
    """`/v1/generations`: the caller's latest requests, newest first."""

    limit: Annotated[int, Field(ge=1, le=100)] = 20
    cursor: Cursor | None = None  # the previous page's next_cursor


class AccountQuery(_Request):
    """A page of accounts by id, in id order; `query` keeps the ids containing it (any case)."""

    query: Annotated[str, Field(max_length=128)] = ""
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    cursor: AccountId | None = None  # the previous page's next_cursor (the last id it showed)


class DeadLetterQuery(_Request):
    account_id: AccountId | None = None  # absent: every account's


class WebhookReplay(_Request):
    account_id: AccountId | None = None  # absent: every account's dead letters


def _distinct(dimensions: str) -> str:
    if len(set(dimensions.split(","))) != len(dimensions.split(",")):
        raise ValueError("each of model, day and key may appear once")
    return dimensions


GROUP_BY = r"^(model|day|key)(,(model|day|key)){0,2}$"


class UsageQuery(_Request):
    """The range is [from, to); defaults: the 30 days up to now. `group_by` names each of
    model, day (UTC) and key (the API key id) at most once."""

    from_: Time | None = Field(default=None, alias="from")
    to: Time | None = None
    # dimensions, comma-separated: model, day, key (the API key id), each at most once
    group_by: Annotated[str, Field(pattern=GROUP_BY), AfterValidator(_distinct)] = "model"


REQUEST_ID = r"^req_[A-Za-z0-9]{1,64}$"  # relay.request_id: "req_" and 24 hex digits


class GenerationQuery(_Request):
    """`GET /v1/generation?id=`: a request id from an `x-request-id` header."""

    id: Annotated[str, Field(pattern=REQUEST_ID)]


class ExportQuery(_Request):
    format: Literal["csv", "jsonl"] = "jsonl"


# what a value of each pattern looks like, said instead of the regular expression
PATTERN_HINTS = {
    keyspace.ACCOUNT_ID.pattern: "must be 1-128 letters, digits or _.:@- starting with a letter or digit",
    CURSOR: "must be the next_cursor of the previous page",
    GROUP_BY: "must be model, day or key, or several of them comma-separated (model,day)",
    REQUEST_ID: "must be a request id: req_ and up to 64 letters or digits (the x-request-id header)",
}


def parse(model: type[M], data: Mapping[str, Any] | None) -> M:
    """Validate into `model`; every problem becomes one 400 naming its field."""
    encodable(data)
    try:
        return model.model_validate(dict(data or {}))
    except ValidationError as exc:
        problems = exc.errors(include_url=False, include_input=False)
        first = ".".join(str(p) for p in problems[0]["loc"]) or None
        message = "; ".join(_problem(p) for p in problems)
        raise errors.InvalidRequest(f"Invalid request: {message}", param=first) from None


def encodable(data: Any) -> None:
    """What is stored or answered is JSON again: Python's parser takes what orjson cannot
    write (integers past 64 bits, lone surrogates such as "\\ud800"); a 400 here, not a
    500 at the write."""
    try:
        orjson.dumps(data, default=str)  # Decimal (our exact numbers) -> str
    except orjson.JSONEncodeError as exc:
        raise errors.InvalidRequest(f"Invalid request: a value cannot be stored as JSON ({exc}).") from None


def _problem(problem: Any) -> str:
    loc = ".".join(str(p) for p in problem["loc"])
    text = problem["msg"]
    if problem["type"] == "value_error":  # our validators' messages, without pydantic's prefix
        text = str(problem.get("ctx", {}).get("error", text))
    elif problem["type"] == "extra_forbidden":
        text = "unknown field"
    elif problem["type"] == "string_pattern_mismatch":
        text = PATTERN_HINTS.get(problem.get("ctx", {}).get("pattern"), text)
    return f"{loc}: {text}" if loc else text


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def loads(body: bytes | str) -> dict[str, Any]:
    """A JSON object with numbers kept exact (Decimal); anything else is a 400."""
    if not body.strip():  # POST with no body: the same as {}
        return {}
    try:
        data = json.loads(body, parse_float=Decimal, parse_constant=_no_constants)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than any real request
        raise errors.InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
        ) from None
    if not isinstance(data, dict):
        raise errors.InvalidRequest("The request body must be a JSON object.")
    return data
