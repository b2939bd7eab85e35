"""Configuration: the YAML schema (the README's configuration reference) as frozen
pydantic models, rooted at `Config`.

Field types normalise and check values; `configrefs.reference_errors` checks the rules
that span sections (names one section gives another, tier order). Reading a YAML file
into a `Config` is `configfile`'s job.

Empty values: an unset `${VAR}` expands to "". In an optional field "" means "not set"
(`api_key: "${OPENAI_API_KEY:-}"` -> no key is sent upstream; an empty `admin_token`
-> None, the admin API is disabled); in a required field it is an error.
Relative paths (`data_dir`) are relative to the working directory, not the file.
"""

import base64
import binascii
import ipaddress
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .configrefs import format_loc, reference_errors
from .money import MAX_MICRO
from .prices import resolve as resolve_catalog

ONE_MICRO_USD = Decimal("0.000001")  # the smallest amount: config amounts have at most 6 places
MAX_USD = (MAX_MICRO + 1) * ONE_MICRO_USD  # Lua numbers are doubles: amounts stay below 2^53 micro-USD
# Validation context key: the YAML loader reports reference errors itself, with lines.
DEFER_REFERENCE_CHECKS = "defer_reference_checks"


# --- field types -------------------------------------------------------------------


def _blank_to_none(v: Any) -> Any:
    # "${VAR:-}" expands to "": for an optional field that means "not set".
    return None if isinstance(v, str) and not v.strip() else v


def _none_to_empty(v: Any) -> Any:
    # `billing:` with nothing under it means "all defaults", not an error.
    return {} if v is None else v


def _required_text(v: Any) -> Any:
    if isinstance(v, str):
        v = v.strip()
        if not v:
            raise ValueError("must not be empty (is its environment variable set?)")
    return v


def _decimal_in(v: Any) -> Any:
    if isinstance(v, bool):  # pydantic turns only ValueError into a field error
        raise ValueError("must be a number, not a boolean")
    if isinstance(v, float):
        # str() is the shortest repr, so YAML 2.5 -> Decimal("2.5"); no float survives.
        return Decimal(str(v))
    return v.strip() if isinstance(v, str) else v


def _decimal_out(v: Decimal) -> Decimal:
    # NaN/inf are already refused by pydantic's Decimal (allow_inf_nan=False).
    if v < 0:
        raise ValueError("must not be negative")
    if v >= MAX_USD:
        raise ValueError(f"must be below {MAX_USD}")
    if v != v.quantize(ONE_MICRO_USD):
        raise ValueError("must have at most 6 decimal places (micro-USD)")
    return v


def _http_url(v: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return v.rstrip("/")


def _redis_url(v: SecretStr) -> SecretStr:
    # The URL may carry a password: never echo it in the message.
    if urlsplit(v.get_secret_value()).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return v


def _webhook_secret(v: SecretStr) -> SecretStr:
    raw = v.get_secret_value()
    if not raw.startswith("whsec_"):
        raise ValueError("must start with 'whsec_'")
    try:
        key = base64.b64decode(raw.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        key = b""
    if not key:
        raise ValueError("must be 'whsec_' followed by non-empty base64")
    return v


Amount = Annotated[Decimal, BeforeValidator(_decimal_in), AfterValidator(_decimal_out)]
OptAmount = Annotated[Amount | None, BeforeValidator(_blank_to_none)]
OptPositiveAmount = Annotated[Annotated[Amount, Field(gt=0)] | None, BeforeValidator(_blank_to_none)]
_Required = BeforeValidator(_required_text)
_EmptyOk = BeforeValidator(_none_to_empty)
Text = Annotated[str, _Required]
OptText = Annotated[str | None, BeforeValidator(_blank_to_none)]
HttpUrlText = Annotated[str, _Required, AfterValidator(_http_url)]
OptSecret = Annotated[SecretStr | None, BeforeValidator(_blank_to_none)]


def _header_safe(v: SecretStr | None) -> SecretStr | None:
    # sent in a request head (Authorization): a CR or LF would end the header line early
    if v is not None and any(c in v.get_secret_value() for c in "\r\n\0"):
        raise ValueError("must not contain a line break or NUL (a trailing newline from an env file?)")
    return v


HeaderSecret = Annotated[OptSecret, AfterValidator(_header_safe)]
WebhookSecret = Annotated[SecretStr, _Required, AfterValidator(_webhook_secret)]
Port = Annotated[int, Field(ge=0, le=65535)]  # 0 = any free port (tests)
PosInt = Annotated[int, Field(ge=1)]
OptPosInt = Annotated[PosInt | None, BeforeValidator(_blank_to_none)]
PosFloat = Annotated[float, Field(gt=0)]  # durations only, never money


# --- models ------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Frozen):
    host: Text = "0.0.0.0"
    port: Port = 8080
    admin_host: Text = "127.0.0.1"
    admin_port: Port = 8081
    admin_token: OptSecret = None  # None: admin API disabled
    max_body_bytes: PosInt = 10 * 1024 * 1024
    keepalive_timeout_s: PosFloat = 75.0  # a connection with no request in progress is closed after this
    header_timeout_s: PosFloat = 10.0  # a request head must arrive whole this long after its first byte
    usage_page: bool = True  # the customer usage page at /usage on the client listener (pages.py)
    shutdown_timeout_s: PosFloat = 25.0  # after SIGTERM, requests in flight get this long to finish

    @model_validator(mode="after")
    def _distinct_ports(self) -> "ServerConfig":
        if self.port == self.admin_port != 0:
            raise ValueError("port and admin_port must differ")
        return self

    @model_validator(mode="after")
    def _guarded_admin(self) -> "ServerConfig":
        """Beyond loopback the admin listener needs a real token: refused, not warned."""
        token = self.admin_token.get_secret_value() if self.admin_token else ""
        if not is_loopback(self.admin_host) and (len(token) < MIN_ADMIN_TOKEN or token in WELL_KNOWN_TOKENS):
            raise ValueError(
                f"admin_host {self.admin_host} is reachable beyond loopback: admin_token must be set "
                f"(e.g. from METERING_ADMIN_TOKEN), at least {MIN_ADMIN_TOKEN} characters and not a well-known default"
            )
        return self

    @property
    def admin_disabled_reason(self) -> str | None:
        if self.admin_token is None:
            return "server.admin_token is empty (is its ${VAR} set?): no admin API, /metrics or /readyz"
        return None


MIN_ADMIN_TOKEN = 16
WELL_KNOWN_TOKENS = frozenset({"dev-admin-token", "changeme", "admin", "secret", "token"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


class RedisConfig(_Frozen):
    url: Annotated[SecretStr, _Required, AfterValidator(_redis_url)]
    cluster: bool = False
    max_connections: PosInt = 128  # per process (per node on a cluster); callers beyond it wait
    pool_timeout_s: PosFloat = 2.0  # the longest wait for a free connection, then 503
    # grants, voids and adjustments answer 2xx only once Redis confirms them on disk
    # (WAITAOF) and on `durable_replicas` replicas; else 503 (docs/reliability.md)
    durable_admin_writes: bool = False
    durable_replicas: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _durable_not_on_cluster(self) -> "RedisConfig":
        if self.durable_admin_writes and self.cluster:
            raise ValueError("durable_admin_writes is not supported with cluster: true (WAITAOF is per node)")
        return self


class UpstreamConfig(_Frozen):
    base_url: HttpUrlText  # trailing "/" removed
    api_key: HeaderSecret = None  # None: no Authorization header upstream
    timeout_s: PosFloat = 600.0
    connect_timeout_s: PosFloat = 10.0
    provider: Text = "openai"  # whose prices `price: catalog` takes (a genai-prices provider id)


SERVICE_TIERS = ("priority", "flex", "scale")  # OpenAI's names; `auto`/`default` are the base price


class LongContextPriceConfig(_Frozen):
    """The prices of a whole request whose input exceeds `above_input_tokens`."""

    above_input_tokens: PosInt
    input: OptAmount = None  # None: the tier's own price of that kind
    cached_input: OptAmount = None
    output: OptAmount = None
    audio_input: OptAmount = None
    audio_output: OptAmount = None


def _ascending_thresholds(v: tuple[LongContextPriceConfig, ...]) -> tuple[LongContextPriceConfig, ...]:
    thresholds = [lc.above_input_tokens for lc in v]
    if thresholds != sorted(set(thresholds)):
        raise ValueError("above_input_tokens must be unique and ascending")
    return v


LongContextList = Annotated[tuple[LongContextPriceConfig, ...], AfterValidator(_ascending_thresholds)]


class TierPriceConfig(_Frozen):
    """A service tier's prices; a missing one is the model's base price of that kind."""

    input: OptAmount = None
    cached_input: OptAmount = None
    output: OptAmount = None
    audio_input: OptAmount = None
    audio_output: OptAmount = None
    long_context: LongContextList = ()


def _known_tiers(v: dict[str, TierPriceConfig]) -> dict[str, TierPriceConfig]:
    unknown = sorted(set(v) - set(SERVICE_TIERS))
    if unknown:
        raise ValueError(f"unknown service tier {unknown[0]!r} (known: {', '.join(SERVICE_TIERS)})")
    return v


ServiceTiers = Annotated[dict[str, TierPriceConfig], _EmptyOk, AfterValidator(_known_tiers)]


class PriceConfig(_Frozen):
    """USD per 1M tokens. `source: catalog` (`price: catalog`): filled from the price
    catalog before validation (prices.resolve), the fields given here over it."""

    source: Literal["config", "catalog"] = "config"
    input: Amount
    cached_input: OptAmount = None  # None: priced at `input`
    output: OptAmount = None  # None: free (embeddings); catalog.price_of applies the defaults
    audio_input: OptAmount = None  # None: audio input tokens cost `input`
    audio_output: OptAmount = None  # None: audio output tokens cost `output`
    service_tiers: Annotated[dict[str, TierPriceConfig], _EmptyOk, AfterValidator(_known_tiers)] = Field(
        default_factory=dict
    )
    long_context: LongContextList = ()

    @model_validator(mode="after")
    def _long_context_per_tier(self) -> "PriceConfig":
        # A long request at a tier needs that tier's long-context prices: never guess them.
        for name, tier in self.service_tiers.items():
            if self.long_context and not tier.long_context:
                raise ValueError(f"service_tiers.{name}.long_context must be set when long_context is")
        return self


class ImageTokenLimits(_Frozen):
    low: PosInt  # an image at `detail: low`
    high: PosInt  # at `high` or `auto`


class ModelConfig(_Frozen):
    upstream: Text
    upstream_model: OptText = None  # None: the configured name is sent upstream
    encoding: OptText = None  # tiktoken encoding for estimates
    max_output_tokens: OptPosInt = None  # reserved when a request names no max (worst case)
    # the context window: reserved as the prompt when part of it cannot be counted here
    # (files, audio, prompts stored upstream, hosted tools), and the most any prompt reserves
    max_input_tokens: OptPosInt = None
    # the chat field that carries a forwarded output cap (providers without max_completion_tokens)
    max_tokens_field: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    # the most one image costs, in tokens (None: the model's known worst case, else gpt-4o's)
    image_tokens: ImageTokenLimits | None = None
    # hosted tools (web_search, file_search, ...) re-read the context on every call: each
    # request may make at most this many (forwarded as `max_tool_calls`); None refuses them
    max_tool_calls: Annotated[int, Field(ge=0)] | None = None
    # bills hidden reasoning as output (None: guessed from the name: o1/o3/o4/gpt-5...)
    reasoning: bool | None = None
    price: PriceConfig
    markup_percent: OptAmount = None  # None: billing.markup_percent


class BillingConfig(_Frozen):
    markup_percent: Amount = Decimal(0)
    default_max_output_tokens: PosInt = 4096  # for models without max_output_tokens
    on_insufficient: Literal["reject", "clamp"] = "reject"
    reservation_ttl_s: PosInt = 900


class ModelLimits(_Frozen):
    rpm: PosInt
    tpm: PosInt


class Tier(_Frozen):
    name: Text
    min_usd: Amount
    rpm: PosInt
    tpm: PosInt
    min_days_since_first_payment: Annotated[int, Field(ge=0)] = 0
    models: Annotated[dict[str, ModelLimits], _EmptyOk] = Field(default_factory=dict)


DEFAULT_TIERS = (Tier(name="default", min_usd=Decimal(0), rpm=10_000, tpm=100_000_000),)


class RateTiersConfig(_Frozen):
    basis: Literal["paid", "consumed"] = "paid"
    tiers: Annotated[tuple[Tier, ...], Field(min_length=1)] = DEFAULT_TIERS


class Allocation(_Frozen):
    amount_usd: Amount
    every: Literal["day", "week", "month", "year"]


class Overage(_Frozen):
    limit_usd: OptAmount = None  # None: no limit (section absent: no overage at all)
    invoice_every_usd: OptPositiveAmount = None


class OnExhausted(_Frozen):
    downgrade_to: Text


class Plan(_Frozen):
    allocation: Allocation | None = None
    overage: Overage | None = None
    on_exhausted: OnExhausted | None = None


class WebhooksConfig(_Frozen):
    url: HttpUrlText
    secret: WebhookSecret  # signs every delivery
    # during a rotation, also sign with these (receivers verify if any signature matches)
    previous_secrets: Annotated[tuple[WebhookSecret, ...], Field(max_length=4)] = ()
    # Normalised to unique values, highest first.
    low_balance_thresholds_usd: tuple[Amount, ...] = ()
    max_attempts: PosInt = 8
    timeout_s: PosFloat = 10.0
    auto_topup_cooldown_s: Annotated[int, Field(ge=0)] = 300

    @field_validator("low_balance_thresholds_usd")
    @classmethod
    def _descending(cls, v: tuple[Decimal, ...]) -> tuple[Decimal, ...]:
        return tuple(sorted(set(v), reverse=True))

    def signing_keys(self) -> tuple[bytes, ...]:
        """The HMAC keys of the Standard Webhooks secrets, the current one first."""
        secrets = (self.secret, *self.previous_secrets)
        return tuple(base64.b64decode(s.get_secret_value().removeprefix("whsec_")) for s in secrets)


class MetricsConfig(_Frozen):
    per_account_labels: bool = False
    created_series: bool = False  # prometheus_client's `_created` series (off: half the series)


class Config(_Frozen):
    server: Annotated[ServerConfig, _EmptyOk] = Field(default_factory=ServerConfig)
    redis: RedisConfig | None = None  # None: embedded redis-server, data in data_dir
    data_dir: Annotated[Path, _Required] = Path(".metering-proxy")
    upstreams: Annotated[dict[Text, UpstreamConfig], Field(min_length=1)]
    models: Annotated[dict[Text, ModelConfig], Field(min_length=1)]
    billing: Annotated[BillingConfig, _EmptyOk] = Field(default_factory=BillingConfig)
    rate_tiers: Annotated[RateTiersConfig, _EmptyOk] = RateTiersConfig()
    plans: Annotated[dict[Text, Plan], _EmptyOk] = Field(default_factory=dict)
    default_plan: OptText = None  # plan given to new accounts
    webhooks: WebhooksConfig | None = None
    metrics: Annotated[MetricsConfig, _EmptyOk] = Field(default_factory=MetricsConfig)

    @model_validator(mode="before")
    @classmethod
    def _fill_from_catalog(cls, data: Any, info: ValidationInfo) -> Any:
        # configfile fills them itself, to report its errors with line numbers.
        if info.context and info.context.get(DEFER_REFERENCE_CHECKS):
            return data
        data, errors = resolve_catalog(data)
        if errors:
            raise ValueError("; ".join(f"{format_loc(loc)}: {msg}" for loc, msg in errors))
        return data

    @model_validator(mode="after")
    def _check_references(self, info: ValidationInfo) -> "Config":
        # configfile defers these to report them with line numbers.
        if info.context and info.context.get(DEFER_REFERENCE_CHECKS):
            return self
        errors = reference_errors(self.model_dump())
        if errors:
            raise ValueError("; ".join(f"{format_loc(loc)}: {msg}" for loc, msg in errors))
        return self

    def markup_for(self, model: str) -> Decimal:
        override = self.models[model].markup_percent
        return self.billing.markup_percent if override is None else override

    def upstream_model(self, model: str) -> str:
        return self.models[model].upstream_model or model

    def secrets(self) -> list[str]:
        """Every secret value present, for log redaction."""
        found: list[SecretStr | None] = [self.server.admin_token]
        found += [u.api_key for u in self.upstreams.values()]
        if self.webhooks:
            found += [self.webhooks.secret, *self.webhooks.previous_secrets]
        values = [s.get_secret_value() for s in found if s is not None]
        if self.redis:
            password = urlsplit(self.redis.url.get_secret_value()).password
            values += [password, unquote(password)] if password else []
        return list(dict.fromkeys(v for v in values if v))
