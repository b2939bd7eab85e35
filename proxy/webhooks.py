"""Webhook delivery from the per-account Redis outboxes (Standard Webhooks signing)."""

from __future__ import annotations

from .state import State


class Webhooks:
    def __init__(self, state: State) -> None:
        self.state = state

    async def deliver(self, account_id: str) -> int:
        """Deliver the account's pending events; returns the next retry time in ms (0: none)."""
        return 0
