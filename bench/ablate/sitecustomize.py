"""For `bench.py --ablate` only, never a mode of the proxy: with METERING_BENCH_ABLATE=1
in its environment (and this directory first on PYTHONPATH) the proxy runs without its
access log and request metrics, counts every prompt as it counted the first, and takes
the first reply of admit and of settle as every later one's, without asking Redis. What
it then costs is the price of everything else: aiohttp's server, the upstream hop and
the metering logic."""

from __future__ import annotations

import os
from typing import Any

if os.environ.get("METERING_BENCH_ABLATE") == "1":
    from proxy import metrics, prompts, relay, resp, scripts

    relay.access_log = lambda *args, **kwargs: None  # the log line and the metrics it updates

    class _Unmeasured:
        def inc(self, *args: Any) -> None: ...
        def dec(self, *args: Any) -> None: ...
        def observe(self, *args: Any) -> None: ...

    _unmeasured = _Unmeasured()
    metrics.child = lambda *args: _unmeasured
    metrics.RESERVATIONS_OPEN = _unmeasured

    _measure = prompts.measure_prompt
    _counted: list[Any] = []

    def _first_count(*args: Any, **kwargs: Any) -> Any:
        if not _counted:
            _counted.append(_measure(*args, **kwargs))
        return _counted[0]

    prompts.measure_prompt = _first_count

    _call = resp.RespClient.call
    _replies: dict[str, Any] = {}
    # FCALL names the function, EVALSHA (Redis 6.2) the script's sha
    _names = {
        called: name for name, script in scripts.SCRIPTS.items() for called in (script.function, script.sha) if called
    }

    async def _first_reply(self: resp.RespClient, *args: Any) -> Any:
        name = _names.get(str(args[1]), "") if args[0] in ("FCALL", "EVALSHA") else ""
        if name not in ("admit", "settle"):
            return await _call(self, *args)
        if name not in _replies:
            _replies[name] = await _call(self, *args)
        return _replies[name]

    resp.RespClient.call = _first_reply  # type: ignore[method-assign]
