"""Rate-limit figures and OpenAI's `x-ratelimit-*` headers.

Windows are a rolling minute of 1-second buckets in Redis (lua/admit.lua): a request
counts against the 60 buckets ending at its second, so the precision is 1 s. `reset`
is the time until the oldest counted second leaves the window, i.e. when remaining
capacity next grows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateFigures:
    limit_requests: int
    remaining_requests: int
    reset_requests_ms: int
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_ms: int

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(self.remaining_requests),
            "x-ratelimit-reset-requests": go_duration(self.reset_requests_ms),
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-tokens": str(self.remaining_tokens),
            "x-ratelimit-reset-tokens": go_duration(self.reset_tokens_ms),
        }


def go_duration(ms: int) -> str:
    """Format like Go's time.Duration, as OpenAI does: 0s, 12ms, 1s, 1.5s, 6m0s."""
    ms = max(0, int(ms))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    seconds = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def retry_headers(retry_ms: int) -> dict[str, str]:
    retry_ms = max(1, int(retry_ms))
    return {"retry-after": str(-(-retry_ms // 1000)), "retry-after-ms": str(retry_ms)}
