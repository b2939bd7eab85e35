"""`serve --demo`: a newcomer sees a metered request succeed without an OpenAI account.

Every upstream is pointed at a built-in fake OpenAI (proxy.demo_upstream) and a demo
account is funded with $10 of promotional credit (once: the grant is idempotent).
"""

from __future__ import annotations

from typing import Any

import structlog

from .config import Config
from .demo_upstream import DemoUpstream
from .embedded import free_port

log = structlog.get_logger("proxy.demo")
DEMO_ACCOUNT = "demo"
_upstream = DemoUpstream()
_port = free_port()


def demo_config(config: Config) -> Config:
    base_url = f"http://127.0.0.1:{_port}/v1"
    upstreams = {name: u.model_copy(update={"base_url": base_url}) for name, u in config.upstreams.items()}
    return config.model_copy(update={"upstreams": upstreams})


async def demo_started(proxy: Any) -> None:
    await _upstream.start(port=_port)
    state = proxy.state
    try:
        await state.ledger.save_account(DEMO_ACCOUNT, {}, create=True)
    except Exception:  # already there from an earlier run
        pass
    await state.ledger.grant(
        DEMO_ACCOUNT,
        {
            "id": "grant_demo_welcome",
            "kind": "promotional",
            "amount": "10000000",
            "priority": 0,
            "effective_at": 0,
            "expires_at": 0,
            "description": "demo credit",
            "idem": "demo-welcome",
        },
    )
    _, key = await state.accounts.create_key(DEMO_ACCOUNT, name="demo")
    port = proxy.ports["client"]
    print(
        f"\n  demo key (shown once): {key}\n\n"
        f"  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Authorization: Bearer {key}' \\\n"
        f"    -H 'content-type: application/json' \\\n"
        f'    -d \'{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hi"}}]}}\' -i\n\n'
        f"  curl -s http://127.0.0.1:{port}/v1/credits -H 'Authorization: Bearer {key}'\n",
        flush=True,
    )
