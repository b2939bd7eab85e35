"""The proxy's errors, each knowing its HTTP status and OpenAI `type`/`code`.

    ProxyError
    ├── InvalidRequest          400 invalid_request_error
    ├── InvalidApiKey           401 invalid_api_key
    ├── InsufficientQuota       402 insufficient_quota | key_limit_exceeded
    ├── PermissionDenied        403 model_not_allowed | account_suspended
    ├── NotFound                404
    ├── RequestTimeout          408 (the body trickled in too slowly)
    ├── BodyTooLarge            413
    ├── RateLimited             429 rate_limit_exceeded (type requests | tokens)
    ├── ClientGone              499 (the client hung up mid-request; nobody reads it)
    ├── UpstreamUnavailable     502 (the upstream failed before answering)
    │   └── UpstreamBroken      (it answered, then broke off its body or stream)
    ├── StoreUnavailable        503 (Redis unreachable: fail closed)
    └── UpstreamTimeout         504

Foreign exceptions (aiohttp, redis) are mapped to these at the boundary; `to_body`
renders every one of them in OpenAI's error shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from redis import exceptions as redis_errors


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type
        self.headers = dict(headers or {})

    def to_body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class InvalidApiKey(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class InsufficientQuota(ProxyError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_quota"


class PermissionDenied(ProxyError):
    status = 403
    type = "invalid_request_error"


def model_not_allowed(model: str) -> PermissionDenied:
    return PermissionDenied(f"This API key may not use the model `{model}`.", param="model", code="model_not_allowed")


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ProxyError):
    status = 429
    code = "rate_limit_exceeded"


class ClientGone(ProxyError):
    """The client hung up before its request was read: nobody to answer (logged as 499)."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class UpstreamUnavailable(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamBroken(UpstreamUnavailable):
    """The upstream answered, then broke off its body or stream (the upstream seam maps
    aiohttp's errors to this)."""


class StoreUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "metering_unavailable"


class WriteNotDurable(ProxyError):
    """An admin money write Redis could not confirm on disk (redis.durable_admin_writes)."""

    status = 503
    type = "server_error"
    code = "write_not_durable"


# Redis failures that mean "the store cannot answer now", mapped to StoreUnavailable
# (fail closed, 503; a settlement retries). Both transports (redis-py and resp.py) raise
# redis-py's types for the same replies. ConnectionError covers a full pool
# (MaxConnectionsError) and a Redis still loading its dataset (LOADING, BusyLoadingError);
# a replica refusing writes after a failover (READONLY) and a Redis at its maxmemory
# refusing writes (OOM, noeviction) are the same kind of wait. On
# Redis Cluster also a failed master (CLUSTERDOWN, MASTERDOWN), a slot in migration
# (TRYAGAIN) and no node answering the topology query (redis-py's
# RedisClusterException, which SlotNotCoveredError extends).
REDIS_DOWN: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,
    redis_errors.BusyLoadingError,
    redis_errors.MaxConnectionsError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.TimeoutError,
    redis_errors.ClusterError,
    redis_errors.TryAgainError,
    redis_errors.RedisClusterException,
)
STORE_DOWN: tuple[type[Exception], ...] = (*REDIS_DOWN, OSError)  # and the socket itself


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"
