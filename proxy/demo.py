"""`serve --demo`: a newcomer sees a metered request succeed without an OpenAI account.

Every upstream is pointed at the built-in fake OpenAI (`proxy.testing.upstream`) and a
demo account is funded with $10 of promotional credit (once: the grant is idempotent).
"""

from __future__ import annotations

from typing import Any

from . import errors
from .config import Config
from .embedded import free_port
from .ledger import GrantSpec
from .testing.upstream import DemoUpstream

DEMO_ACCOUNT = "demo"
WELCOME = GrantSpec("promotional", 10_000_000, description="demo credit", idem="demo-welcome", id="grant_demo_welcome")


class Demo:
    """The fake upstream every model is pointed at, on a port of its own."""

    def __init__(self) -> None:
        self.upstream = DemoUpstream()
        self.port = free_port()

    def config(self, config: Config) -> Config:
        base_url = f"http://127.0.0.1:{self.port}/v1"
        upstreams = {name: u.model_copy(update={"base_url": base_url}) for name, u in config.upstreams.items()}
        return config.model_copy(update={"upstreams": upstreams})

    async def started(self, proxy: Any) -> None:
        await self.upstream.start(port=self.port)
        state = proxy.state
        try:
            await state.ledger.save_account(DEMO_ACCOUNT, {}, create=True)
        except errors.InvalidRequest as exc:
            if exc.code != "account_exists":  # there from an earlier run: fine
                raise
        await state.ledger.grant(DEMO_ACCOUNT, WELCOME)
        _, key = await state.key_store.create_key(DEMO_ACCOUNT, name="demo")
        port = proxy.ports["client"]
        pages = ""
        if proxy.config.server.usage_page:
            pages += f"  usage page (sign in with the demo key): http://127.0.0.1:{port}/usage\n"
        if "admin" in proxy.ports:  # an empty admin_token disables the admin listener
            pages += f"  console (sign in with server.admin_token): http://127.0.0.1:{proxy.ports['admin']}/\n"
        print(
            f"\n  demo key (shown once): {key}\n\n"
            f"  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Authorization: Bearer {key}' \\\n"
            f"    -H 'content-type: application/json' \\\n"
            f'    -d \'{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hi"}}]}}\' -i\n\n'
            f"  curl -s http://127.0.0.1:{port}/v1/credits -H 'Authorization: Bearer {key}'\n\n"
            f"{pages}\n"
            "  in another terminal: source .venv/bin/activate && metering-proxy accounts list\n",
            flush=True,
        )
