"""Assembling and running the proxy: Redis, services, both listeners, background work.

`Proxy` owns the lifecycle; `serve()` runs it until SIGINT/SIGTERM and reloads the
config on SIGHUP or when the file changes (a bad file is refused; the old config keeps
serving).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from . import admin, api, errors, listener, logs, metrics, pool
from .catalog import Catalog
from .config import Config
from .configfile import ConfigError, load_config
from .embedded import EmbeddedRedis
from .journal import Journal
from .keys import KeyCache, KeyStore
from .ledger import Checkpoint, Ledger
from .resp import RespClient
from .scripts import SCRIPTS
from .state import STATE, InFlight, State
from .upstream import Upstream
from .webhooks import Webhooks
from .worker import Worker

log = structlog.get_logger("proxy")
RELOAD_POLL_S = 1.0
CHECKPOINT_S = 1.0  # a killed proxy's streams are charged up to a checkpoint this old


def connect(url: str, cluster: bool = False, size: int = pool.SIZE, pool_timeout_s: float = pool.TIMEOUT_S) -> Redis:
    """Fail fast: a metered request must get its 503 within 2 s when Redis is gone. A
    burst waits for a pooled connection (up to `pool_timeout_s`) instead of failing.
    A connection error is retried once on a fresh connection: one idle in the pool may
    predate a Redis restart (every script is safe to run twice: see ledger.py)."""
    retry = Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,))
    options: dict[str, Any] = dict(
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
        retry=retry,
        retry_on_error=[redis_errors.ConnectionError],  # without it redis-py retries nothing
    )
    return pool.connect(url, cluster, size, pool_timeout_s, **options)


def lean_client(url: str, config: Config) -> RespClient | None:
    """The hot path's own client (resp.py) where it applies: not TLS, not Cluster."""
    if (config.redis is not None and config.redis.cluster) or not RespClient.supports(url):
        return None
    return RespClient(url)


class Proxy:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.embedded: EmbeddedRedis | None = None
        self.state: State | None = None
        self.webhooks: Webhooks | None = None
        self.worker: Worker | None = None
        self.runners: dict[str, web.AppRunner] = {}
        self.worker_task: asyncio.Task[None] | None = None
        self.loops: list[asyncio.Task[None]] = []  # cancelled at stop: checkpoints, config watcher
        self.ports: dict[str, int] = {}
        self._config_stamp: tuple[float, int] | None = None

    async def start(self) -> State:
        config = self.config
        logs.REDACTOR.use(config.secrets())
        metrics.configure(config.metrics.created_series, config.models, SCRIPTS)
        if config.redis is None:
            # a billing store: every acknowledged write on disk (fsyncs are grouped per event-loop turn)
            self.embedded = EmbeddedRedis(config.data_dir / "redis", appendfsync="always")
            url = await self.embedded.start()
            log.warning(
                "embedded_redis", port=self.embedded.port, note="for production set redis.url to a managed Redis"
            )
            redis = connect(url)
        else:
            url = config.redis.url.get_secret_value()
            redis = connect(url, config.redis.cluster, config.redis.max_connections, config.redis.pool_timeout_s)
        ledger = Ledger(redis, config, fast=lean_client(url, config))
        with contextlib.suppress(*errors.STORE_DOWN):  # else the worker claims it
            await ledger.claim_tier_generation()
        if ledger.durability is not None:
            with contextlib.suppress(*errors.STORE_DOWN):  # else the first admin write probes
                barrier = await ledger.durability.probe(redis)
                note = log.error if ledger.durability.unconfirmable else log.info
                note("durable_admin_writes", barrier=barrier)
        catalog = await asyncio.to_thread(Catalog, config)  # loads tiktoken encodings (~1 s CPU)
        upstream = Upstream(config.secrets())
        await upstream.start()
        journal = Journal(config.data_dir / "journal")
        journal.open()  # takes over the journals of proxies that died
        state = State(config, redis, ledger, KeyStore(redis), KeyCache(redis), catalog, upstream, journal)
        self.state = state
        await journal.replay(ledger.settle)  # what Redis cannot take now, the worker replays later
        await self._listen("client", api.client_app(), config.server.host, config.server.port, state)
        if config.server.admin_token is not None:
            await self._listen("admin", admin.admin_app(), config.server.admin_host, config.server.admin_port, state)
        else:
            log.warning("admin_listener_disabled", reason=config.server.admin_disabled_reason)
        self.webhooks = Webhooks(state)
        self.worker = Worker(ledger, self.webhooks.deliver, journal=journal)
        self.worker_task = asyncio.create_task(self.worker.run(), name="worker")
        self.loops.append(asyncio.create_task(self._checkpoint_reservations(), name="checkpoints"))
        if self.config_path is not None:
            self._config_stamp = _stamp(self.config_path)
            self.loops.append(asyncio.create_task(self._watch_config(), name="config-watcher"))
        log.info("started", **{f"{name}_port": port for name, port in self.ports.items()})
        return state

    async def _listen(self, name: str, app: web.Application, host: str, port: int, state: State) -> None:
        app[STATE] = state
        server = state.config.server
        # lingering_time: how long an unread (e.g. 413) body is drained before closing
        runner = listener.Runner(
            app,
            header_timeout_s=server.header_timeout_s,
            keepalive_timeout=server.keepalive_timeout_s,
            access_log=None,
            handle_signals=False,
            lingering_time=1.0,
            shutdown_timeout=server.shutdown_timeout_s,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        self.runners[name] = runner
        self.ports[name] = runner.addresses[0][1]  # the bound port, when asked for port 0

    async def stop(self) -> None:
        """Drain, then stop: the client listener takes no new connection (idle keep-alive
        ones are closed), the requests in flight, streams included, get
        `server.shutdown_timeout_s` to finish and are settled (past it they are cut and
        charged for what was relayed); meanwhile checkpoints go on and /readyz says
        `draining`. Then the background work, the admin listener and Redis."""
        if self.state is not None:
            self.state.draining = True
            timeout_s = self.config.server.shutdown_timeout_s
            log.info("draining", requests_in_flight=len(self.state.inflight), timeout_s=timeout_s)
        if "client" in self.runners:  # first: the admin listener's /readyz and /metrics stay up
            await self.runners["client"].cleanup()  # waits for in-flight requests and their settlements
        if self.worker is not None:
            self.worker.stop()  # lets a delivery in flight finish and release its lease
        for task in self.loops:
            task.cancel()
        tasks = [*self.loops, *([self.worker_task] if self.worker_task else [])]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
        for name, runner in self.runners.items():
            if name != "client":
                await runner.cleanup()
        left = 0  # settlements still in the journal: the next start on this data_dir replays them
        if self.state is not None:
            if self.state.background:
                await asyncio.gather(*self.state.background, return_exceptions=True)
            await self.state.upstream.close()
            if self.state.journal is not None:
                await self.state.journal.replay(self.state.ledger.settle)
                left = len(self.state.journal.pending)
                self.state.journal.close()  # what is left is replayed by the next start
            if self.webhooks is not None:
                await self.webhooks.close()
            await self.state.redis.aclose()
            if self.state.ledger.fast is not None:
                await self.state.ledger.fast.aclose()
        if self.embedded is not None:
            self.embedded.stop()
        if self.state is not None:  # the operator's word that the drain is over (a rollout, Ctrl-C)
            log.info("stopped", settlements_journaled=left)

    async def reload(self) -> bool:
        """Load the config file again; keep the old one if the new one is bad."""
        assert self.config_path is not None and self.state is not None
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
            catalog = await asyncio.to_thread(Catalog, config)
        except ConfigError as exc:
            metrics.CONFIG_RELOADS.labels("error").inc()
            log.error("config_reload_rejected", path=str(self.config_path), errors=exc.errors)
            return False
        if config.redis != self.config.redis or config.server != self.config.server:
            log.warning("config_reload_partial", note="server and redis changes need a restart")
        self.state.use_config(config, catalog)
        self.config = config
        with contextlib.suppress(*errors.STORE_DOWN):  # else the worker claims it
            await self.state.ledger.claim_tier_generation()
        logs.REDACTOR.use(config.secrets())
        self.state.upstream.scrub.use(config.secrets())
        metrics.configure(config.metrics.created_series, config.models, SCRIPTS)
        metrics.CONFIG_RELOADS.labels("success").inc()
        log.info("config_reloaded", path=str(self.config_path))
        return True

    async def _checkpoint_reservations(self) -> None:
        """Every second, record what the requests in flight have used so far (a stream's
        output as relayed), so that if this process dies the reaper charges it rather
        than releasing it free; and push back their reservations' expiry, so the reaper
        leaves a request that outlives `reservation_ttl_s` alone. One script call per
        account, not per request; unchanged requests only every ttl/3."""
        assert self.state is not None
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(CHECKPOINT_S)  # the checkpoint period, not a synchronisation
            full = time.monotonic() - last_full >= self.config.billing.reservation_ttl_s / 3
            if full:
                last_full = time.monotonic()
            by_account: dict[str, list[tuple[InFlight, Checkpoint]]] = {}
            for meter in list(self.state.inflight.values()):
                point = meter.checkpoint(changed_only=not full)
                if point is not None:
                    by_account.setdefault(meter.account_id, []).append((meter, point))
            await asyncio.gather(*(self._extend(a, sent) for a, sent in by_account.items()))

    async def _extend(self, account_id: str, sent: list[tuple[InFlight, Checkpoint]]) -> None:
        assert self.state is not None
        try:
            await self.state.ledger.extend(account_id, [point for _, point in sent])
        except errors.StoreUnavailable:
            return  # not recorded: the next period sends these again
        for meter, _ in sent:
            meter.checkpointed()

    async def _watch_config(self) -> None:
        assert self.config_path is not None
        while True:
            await asyncio.sleep(RELOAD_POLL_S)  # polling the file's mtime, not a synchronisation
            stamp = _stamp(self.config_path)
            if stamp != self._config_stamp:
                self._config_stamp = stamp
                await self.reload()


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime, st.st_size)


GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (Python's default: 700)


def collect_less() -> None:
    """The cyclic collector, tuned for a server: what startup built (config, tokenizers,
    modules) is frozen out of every later collection, and young collections run every
    20,000 allocations, not 700 (a request allocates thousands; reference counting
    frees nearly all of them, the collector finds little)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def serve(config: Config, config_path: Path | None, on_started: Any = None) -> None:
    proxy = Proxy(config, config_path)
    await proxy.start()
    collect_less()
    if on_started is not None:
        await on_started(proxy)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if config_path is not None:
        reloads: set[asyncio.Task[bool]] = set()  # kept referenced while they run

        def reload_on_sighup() -> None:
            task = loop.create_task(proxy.reload(), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload_on_sighup)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await proxy.stop()
