"""One admitted request's money: what it reserved, what it used, and its settlement,
exactly once, from the relay's `finally` (finished by a task of its own should the
handler be cancelled while settling).

While the request runs it is checkpointed every second (app.py), so that if this
process dies the reaper charges what it had used; when Redis cannot take its
settlement, the journal keeps it until Redis can.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import structlog

from . import errors, metrics
from .catalog import Route
from .intake import ClientRequest
from .journal import JournalFull
from .ledger import Checkpoint, SettleCall
from .money import Usage
from .scripts import Admission, Settlement
from .state import State
from .tokens import OutputCounter
from .usage import StreamTap

log = structlog.get_logger("proxy.access")
SETTLE_ATTEMPTS = 3  # quick retries for a Redis blip; then the journal keeps the settlement


@dataclass
class Meter:
    """One admitted request's money: settled exactly once, from `finally`."""

    state: State
    account_id: str
    key_id: str
    request_id: str
    route: Route  # the model served (a downgrade target, when downgraded)
    client: ClientRequest
    admission: Admission
    prompt_tokens: int
    body: bytes  # what goes upstream
    settled: asyncio.Future[Settlement | None] | None = None  # set once settle() has begun
    usage: Usage | None = None
    tap: StreamTap | None = None  # a stream's usage tap, for a charge if we are cut short
    estimated: bool = False
    outcome: str = "ok"
    timing: dict[str, float] = field(default_factory=dict)  # upstream_ms, ttft_ms for the access log
    answered: bool = False  # the upstream accepted the request: its prompt is being billed
    prompt_exact: bool = True  # prompt_tokens is tiktoken's count (else an estimate of a huge prompt)
    output_bound: int = 0  # the output the upstream may write (the forwarded cap, all choices)
    _checkpointed: tuple[bool, int] = (False, 0)  # (answered, output chars) Redis has recorded
    _sending: tuple[bool, int] = (False, 0)  # the same, of the checkpoint on its way

    @property
    def downgraded(self) -> bool:
        return bool(self.admission.downgrade_to)

    def charge(self, usage: Usage | None, output: OutputCounter | None = None) -> None:
        """Record what to charge; no usage from the upstream means we count it ourselves
        (the prompt as estimated, the output text seen; tokenized only in that case)."""
        if usage is None:
            counted = output.count(self.route.encoding) if output is not None else 0
            if self.route.reasoning and self.answered:  # its hidden reasoning cannot be counted: the bound
                counted = max(counted, self.output_bound)
            usage = Usage(input_tokens=self.prompt_tokens, output_tokens=counted)
            self.estimated = True
        self.usage = usage

    async def settle(self) -> Settlement | None:
        """Settled once, in the caller's task: a task of its own cost 10-40 us a request.
        A caller cancelled on the way (a shutdown past its grace) hands the settlement to
        a task that finishes it; settle.lua is keyed by the request id, so one that had
        already landed is found, not charged again."""
        if self.settled is not None:
            return await asyncio.shield(self.settled)
        if self.usage is None and self.tap is not None:  # cancelled mid-stream (shutdown)
            self.charge(self.tap.usage, self.tap.output)
        self.settled = asyncio.get_running_loop().create_future()
        try:
            settlement = await self._settle()
        except asyncio.CancelledError:
            self.state.spawn(self._settle_after_cancel())
            raise
        except BaseException as exc:
            self._settled(exc)
            raise
        self._settled(settlement)
        return settlement

    async def _settle_after_cancel(self) -> None:
        try:
            settlement = await self._settle()
        except asyncio.CancelledError as exc:
            self._settled(exc)
            raise
        except Exception as exc:  # the settlement's outcome, not the task's: nobody awaits this task
            self._settled(exc)
            log.error("settlement_failed", request_id=self.request_id, account_id=self.account_id, exc_info=exc)
            return
        self._settled(settlement)

    def _settled(self, outcome: Settlement | BaseException | None) -> None:
        assert self.settled is not None
        self.state.inflight.pop(self.request_id, None)
        metrics.RESERVATIONS_OPEN.dec()
        if isinstance(outcome, BaseException):
            self.settled.set_exception(outcome)
            self.settled.exception()  # retrieved: raised to the caller; later callers get it too
        else:
            self.settled.set_result(outcome)

    def checkpoint(self, *, changed_only: bool) -> Checkpoint | None:
        """What the request has used so far, for reap.lua to charge should this process
        die: the prompt once the upstream has answered, plus a stream's output as
        relayed (estimated). None when nothing changed and `changed_only`."""
        chars = self.tap.output.chars if self.tap is not None else 0
        if changed_only and self._checkpointed == (self.answered, chars):
            return None
        self._sending = (self.answered, chars)
        if not self.answered or self.downgraded:
            return Checkpoint(self.request_id)
        output = self.tap.output.count_so_far(self.route.encoding) if self.tap is not None else 0
        usage = Usage(input_tokens=self.prompt_tokens, output_tokens=output)
        return Checkpoint(self.request_id, self.cost(usage), usage.as_dict())

    def checkpointed(self) -> None:
        """Redis recorded the last checkpoint: until the request changes, none is due."""
        self._checkpointed = self._sending

    def cost(self, usage: Usage) -> Decimal:
        """Exact, in micro-USD: at the tier the upstream reported, else the one asked for."""
        return self.route.price.exact_cost(usage, self.client.service_tier)

    def settle_call(self) -> SettleCall:
        usage = self.usage
        entry: dict[str, Any] = {"model": self.route.model, "key_id": self.key_id}
        if usage is None:
            entry["type"] = "release"
            entry["description"] = f"nothing charged: {self.outcome}"
        else:
            entry["usage"] = usage.as_dict()
            entry["estimated"] = self.estimated
            if self.downgraded:
                entry["downgraded_from"] = self.client.model
            elif self.route.price_source:  # absent: the config's own prices
                entry["price_source"] = self.route.price_source
            if tier := usage.service_tier or self.client.service_tier:  # what it was priced at
                entry["service_tier"] = tier
        exact = Decimal(0) if usage is None or self.downgraded else self.cost(usage)
        real_tokens = usage.total_tokens if usage else 0
        return SettleCall(self.account_id, self.client.model, self.request_id, exact, real_tokens, entry)

    async def _settle(self) -> Settlement | None:
        """Settle in Redis; when it stays away, keep the settlement in the journal, which
        applies it once Redis is back (a settlement is never dropped)."""
        if self.estimated and not self.prompt_exact and self.usage is not None:
            # charging our own count of a prompt too long to count on the request path
            exact = await asyncio.to_thread(self.route.prompt_tokens_exact, self.client)
            self.usage = dataclasses.replace(self.usage, input_tokens=exact)
        call = self.settle_call()
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                settlement = await self.state.ledger.settle(call)
            except errors.StoreUnavailable:
                await asyncio.sleep(0.1 * 2**attempt)  # backoff, not synchronisation
                continue
            if self.state.journal is not None:
                self.state.journal.remember(call)  # should Redis lose it in a crash
            return settlement
        if self.state.journal is not None:
            try:
                await self.state.journal.append(call)
                self.outcome += "; settlement journaled (Redis unavailable)"
                log.warning("settlement_journaled", request_id=self.request_id, account_id=self.account_id)
                return None
            except (OSError, JournalFull) as exc:
                log.error("journal_unavailable", request_id=self.request_id, error=str(exc))
        return await self._settle_when_redis_returns(call)

    async def _settle_when_redis_returns(self, call: SettleCall) -> Settlement:
        """No journal to keep it: retry Redis for as long as it takes."""
        delay = 1.0
        while True:
            try:
                return await self.state.ledger.settle(call)
            except errors.StoreUnavailable:
                await asyncio.sleep(delay)  # backoff, not synchronisation
                delay = min(delay * 2, 30.0)
