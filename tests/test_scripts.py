"""The Python-to-Lua contract (proxy/scripts.py): reply layouts, and Lua errors that name
their real file and line."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import pytest
from redis import exceptions as redis_errors

from proxy import keyspace
from proxy.scripts import ACCOUNT_SCRIPTS, LIB, SCRIPTS

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


_FUNCTION = re.compile(r"^local function (\w+)\(")


def _lua_chunks(text: str) -> list[tuple[str | None, str]]:
    """(function name, source) of each top-level function, and (None, the rest)."""
    lines, chunks, rest, i = text.split("\n"), [], [], 0
    while i < len(lines):
        found = _FUNCTION.match(lines[i])
        if not found:
            rest.append(lines[i])
            i += 1
        elif re.search(r"\bend\s*$", lines[i]):  # a one-line function
            chunks.append((found.group(1), lines[i]))
            i += 1
        else:
            end = lines.index("end", i)
            chunks.append((found.group(1), "\n".join(lines[i : end + 1])))
            i = end + 1
    return [*chunks, (None, "\n".join(rest))]


def _uses(text: str) -> tuple[set[str], set[str]]:
    text = re.sub(r"--[^\n]*", "", text)
    return set(re.findall(r"\bK\.(\w+)", text)), set(re.findall(r"\b(\w+)\b", text))


def test_every_script_declares_the_keys_it_may_touch() -> None:
    """What each script reaches, through the lib functions it may call (a static
    over-approximation), is among the KEYS its header declares."""
    lua = resources.files("proxy") / "lua"
    functions: dict[str, tuple[set[str], set[str]]] = {}
    top: set[str] = set()
    for part in LIB:
        for name, source in _lua_chunks((lua / f"lib/{part}.lua").read_text()):
            if name is None:
                top |= _uses(source)[0]
            else:
                functions[name] = _uses(source)
    for script in ACCOUNT_SCRIPTS:
        keys, words = _uses((lua / f"{script}.lua").read_text())
        reached, seen, todo = keys | top, set(), [w for w in words if w in functions]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                reached |= functions[name][0]
                todo += [w for w in functions[name][1] if w in functions]
        declared = {*SCRIPTS[script].keys, *SCRIPTS[script].extra_keys}
        assert reached <= declared, f"{script}.lua reaches {sorted(reached - declared)} without declaring them"


async def test_a_key_a_script_did_not_declare_is_an_error_not_a_nil(proxy: Running) -> None:
    assert "idem" not in SCRIPTS["void"].keys
    await proxy.account("acme", "1")
    redis: Any = proxy.state.redis
    # the account's KEYS with the `K.idem` lookup of grant.lua run under void.lua's declaration
    script = SCRIPTS["void"]
    source = script.source.replace("local gid, reason = ARGV[3], ARGV[4]", "local gid, reason = K.idem, ARGV[4]")
    keys = keyspace.account_keys("acme", "", script.keys)
    with pytest.raises(redis_errors.ResponseError, match="did not declare KEYS `idem`"):
        await redis.eval(source, len(keys), *keys, proxy.state.ledger._context(), 0, "g", "r")
