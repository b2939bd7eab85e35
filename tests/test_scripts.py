"""The Python-to-Lua contract (proxy/scripts.py): reply layouts, and Lua errors that name
their real file and line."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import pytest
from redis import exceptions as redis_errors

from proxy import keyspace
from proxy.scripts import ACCOUNT_SCRIPTS, SCRIPTS

from .conftest import Running


def test_every_account_script_declares_its_replies() -> None:
    for name in ACCOUNT_SCRIPTS:
        replies = SCRIPTS[name].replies
        assert replies, f"{name}.lua states no `-- reply` lines"
        assert all(re.fullmatch(r"[a-z_]+", n) for names in replies.values() for n in names)


def test_a_reply_that_breaks_its_layout_is_refused() -> None:
    script = SCRIPTS["settle"]
    assert script.decode(["duplicate", "1-0", 0]).values == {"ledger_id": "1-0"}
    with pytest.raises(ValueError, match="not as its header says"):
        script.decode(["ok", 5, 0])  # three values short
    with pytest.raises(ValueError, match="not as its header says"):
        script.decode(["surprise", 0])


async def test_a_lua_error_names_the_real_file_and_line(proxy: Running) -> None:
    await proxy.account("acme", "1")
    redis: Any = proxy.state.redis
    # a grant record that is not JSON, due for the lazy bookkeeping every script runs first
    await redis.hset(keyspace.account("acme", "grants"), "broken", "{not json")
    await redis.sadd(keyspace.account("acme", "live"), "broken")
    await redis.hset(keyspace.account("acme", "acct"), "next_change_ms", 1)
    with pytest.raises(redis_errors.ResponseError) as caught:
        await proxy.state.ledger.touch("acme")
    where = re.search(r"lua/(lib/\w+\.lua):(\d+)", str(caught.value))
    assert where, str(caught.value)
    lines = (resources.files("proxy") / "lua" / where.group(1)).read_text().splitlines()
    assert "cjson.decode" in lines[int(where.group(2)) - 1]  # the very line that failed
