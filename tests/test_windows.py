"""The rate windows' running sums (lua/lib/windows.lua) count exactly what a scan of
every bucket in the minute counts: through buckets ageing out at the 60 s boundary,
idle gaps, clock jumps either way and token corrections, at seconds chosen by the test."""

from __future__ import annotations

from importlib import resources
from typing import Any

import openai
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.configfile import parse_config
from proxy.scripts import context

from .conftest import BASE_CONFIG

LUA = resources.files("proxy") / "lua" / "lib"
# A driver over the library: ARGV[3] the op, ARGV[4] the second, ARGV[5] tokens/delta, ARGV[6] a bucket's second.
DRIVER = """
local op, now_s, n = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
if op == 'correct' then
  if tonumber(ARGV[6]) > now_s - 60 then correct_tokens(KEYS[1], tonumber(ARGV[6]), n) end
  return {}
end
local w = open_window(KEYS[1], now_s)
local seen = {w.r, w.t, w.o or -1}
if op == 'admit' then count_admission(w, now_s, n) end
if op == 'buckets' then
  for _, kind in ipairs({'r', 't'}) do
    for _, b in ipairs(window_buckets(w, kind)) do seen[#seen + 1] = kind .. b[1] .. '=' .. b[2] end
  end
end
return seen
"""
SOURCE = "local K = {}\n" + (LUA / "base.lua").read_text() + (LUA / "windows.lua").read_text() + DRIVER
KEY = "mp:{w}:rl"
MESSAGES = [{"role": "user", "content": "hi"}]
CTX = context(parse_config(yaml.safe_dump(BASE_CONFIG)))


class Scan:
    """The window as a full scan sees it: every bucket after now_s - 60 counted."""

    def __init__(self) -> None:
        self.buckets: dict[int, list[int]] = {}

    def open(self, now_s: int) -> list[Any]:
        self.buckets = {s: b for s, b in self.buckets.items() if s > now_s - 60}
        oldest = min(self.buckets, default=-1)
        return [sum(b[0] for b in self.buckets.values()), sum(b[1] for b in self.buckets.values()), oldest]

    def listing(self) -> list[str]:
        ordered = sorted(self.buckets.items())
        return [f"r{s}={b[0]}" for s, b in ordered] + [f"t{s}={b[1]}" for s, b in ordered]


async def run(redis: Any, ctx: bytes, op: str, now_s: int, n: int = 0, sec: int = 0) -> list[Any]:
    reply = await redis.eval(SOURCE, 1, KEY, ctx, 0, op, now_s, n, sec)
    return [v if isinstance(v, int) else v.decode() if isinstance(v, bytes) else v for v in reply]


steps = st.sampled_from([0, 0, 1, 1, 2, 30, 59, 60, 61, 119, 120, 121, 600, -1, -30, -59, -61, -200])
op = st.tuples(st.sampled_from(["admit", "admit", "peek", "correct", "buckets"]), steps, st.integers(0, 50))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=40))
@example(ops=[("admit", 0, 5), ("admit", 59, 3), ("peek", 1, 0), ("buckets", 0, 0)])  # ages out at exactly 60 s
@example(ops=[("admit", 0, 5), ("admit", 1, 1), ("admit", 600, 2), ("admit", -600, 4), ("buckets", 0, 0)])
@example(ops=[("admit", 0, 5), ("admit", 30, 1), ("admit", -200, 1), ("admit", 61, 1), ("buckets", 200, 0)])
async def test_running_sums_match_a_scan_of_the_minute(redis: Any, ops: list[tuple[str, int, int]]) -> None:
    await redis.delete(KEY)
    ctx = CTX
    scan, now_s, admitted = Scan(), 1_000_000, [1_000_000]
    for kind, step, n in ops:
        now_s += step
        if kind == "correct":  # a settlement: the real tokens of an earlier admission
            sec = admitted[n % len(admitted)]
            delta = n - 25
            await run(redis, ctx, "correct", now_s, delta, sec)
            if sec > now_s - 60 and sec in scan.buckets:
                scan.buckets[sec][1] = max(0, scan.buckets[sec][1] + delta)
            continue
        got = await run(redis, ctx, kind, now_s, n)
        assert got[:3] == scan.open(now_s), (kind, now_s, got)
        if kind == "admit":
            scan.buckets.setdefault(now_s, [0, 0])
            scan.buckets[now_s][0] += 1
            scan.buckets[now_s][1] += n
            admitted.append(now_s)
        if kind == "buckets":
            assert sorted(got[3:]) == sorted(scan.listing())


async def test_a_window_written_before_the_sums_is_counted_whole(redis: Any) -> None:
    """Buckets from an older release (no `P:0`): the first admission counts them all."""
    ctx = CTX
    await redis.delete(KEY)
    await redis.hset(KEY, mapping={"r:100": 2, "t:100": 40, "r:130": 1, "t:130": 7, "r:30": 9, "t:30": 9})
    assert await run(redis, ctx, "admit", 150, 5) == [3, 47, 100]
    assert await run(redis, ctx, "peek", 159) == [4, 52, 100]
    assert await run(redis, ctx, "peek", 160) == [2, 12, 130]  # second 100 left the minute


async def test_a_window_lives_a_minute_past_its_newest_second(redis: Any) -> None:
    """Its expiry is set with each second's first admission (not again within the second:
    lib/windows.lua count_admission), so a second's buckets outlive the minute they count in."""
    ctx = CTX
    await redis.delete(KEY)
    await run(redis, ctx, "admit", 700, 5)
    assert 60_000 < await redis.pttl(KEY) <= 61_000
    await redis.pexpire(KEY, 65_000)  # as if the second's first admission came a little later
    await run(redis, ctx, "admit", 700, 5)
    assert await redis.pttl(KEY) > 64_000  # a later admission in that second does not shorten it
    await redis.pexpire(KEY, 1_000)
    await run(redis, ctx, "admit", 701, 5)  # a new second: a minute from now
    assert 60_000 < await redis.pttl(KEY) <= 61_000
    await run(redis, ctx, "admit", 701, 5)
    assert await run(redis, ctx, "peek", 701) == [4, 20, 700]


@pytest.mark.parametrize("late", [0, 59, 60])
async def test_a_correction_reaches_only_a_bucket_still_counted(redis: Any, late: int) -> None:
    ctx = CTX
    await redis.delete(KEY)
    await run(redis, ctx, "admit", 500, 30)
    await run(redis, ctx, "correct", 500 + late, -20, 500)
    expected = [1, 10, 500] if late < 60 else [0, 0, -1]
    assert await run(redis, ctx, "peek", 500 + late) == expected


RPM3 = {"rate_tiers": {"tiers": [{"name": "free", "min_usd": "0", "rpm": 3, "tpm": 1_000_000}]}}


async def test_admissions_age_out_after_a_minute_and_survive_clock_jumps(start_proxy: Any) -> None:
    running = await start_proxy(RPM3)
    key = await running.account("acme", "1")
    client = running.client(key).chat.completions

    async def remaining() -> str:
        raw = await client.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
        return str(raw.headers["x-ratelimit-remaining-requests"])

    assert [await remaining() for _ in range(3)] == ["2", "1", "0"]
    running.state.ledger.clock_offset_ms += 30_000
    with pytest.raises(openai.RateLimitError):
        await remaining()  # still in the minute
    running.state.ledger.clock_offset_ms += 31_000  # 61 s on: the first three left it
    assert await remaining() == "2"
    running.state.ledger.clock_offset_ms += 3_600_000  # an hour on, the window's hash still there
    assert await remaining() == "2"
    running.state.ledger.clock_offset_ms -= 3_600_000  # back: the hour-later admission still counts
    assert await remaining() == "1"


# The window scan of the release before the sums (admit.lua's `window()`), verbatim but
# for its arguments: during a rolling upgrade it reads the hashes this one writes.
OLD_SCAN = """
local key, now_s = KEYS[1], tonumber(ARGV[1])
local flat = redis.call('HGETALL', key)
local used = {r = 0, t = 0}
local stale = {}
for i = 1, #flat, 2 do
  local kind, sec, v = string.sub(flat[i], 1, 1), tonumber(string.sub(flat[i], 3)), tonumber(flat[i + 1])
  if sec <= now_s - 60 then
    stale[#stale + 1] = flat[i]
  else
    used[kind] = used[kind] + v
  end
end
if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
redis.call('HINCRBY', key, 'r:' .. now_s, 1)
redis.call('HINCRBY', key, 't:' .. now_s, 3)
return {used.r, used.t}
"""


async def test_a_release_before_the_sums_reads_and_writes_the_same_windows(redis: Any) -> None:
    await redis.delete(KEY)
    await run(redis, CTX, "admit", 1_000, 5)
    await run(redis, CTX, "admit", 1_010, 7)
    assert await redis.eval(OLD_SCAN, 1, KEY, 1_020) == [2, 12]  # the sums' fields do not trip it
    assert await run(redis, CTX, "admit", 1_030, 1) == [3, 15, 1_000]  # its admission counted
    await redis.hincrby(KEY, "t:1030", 5)  # its settlement: a bucket corrected, not the sums
    # every window is counted again once a minute (when its start passes a multiple of 60 s)
    assert await run(redis, CTX, "peek", 1_080) == [1, 6, 1_030]


async def test_a_window_becomes_a_hashtable_and_one_left_as_a_listpack_is_counted_exactly(redis: Any) -> None:
    """`H:0` keeps a window a hashtable (its fields found without a scan of ~120). A full
    window the previous release left (a listpack: sums, no `H:0`) counts exactly what it
    holds and becomes a hashtable at its next prune."""
    ctx = CTX
    await redis.delete(KEY)
    await run(redis, ctx, "admit", 2_000, 5)
    assert await redis.object("encoding", KEY) == "hashtable"
    await redis.delete(KEY)
    now = 3_000
    buckets = {f"{kind}:{sec}": n for sec in range(now - 59, now) for kind, n in (("r", 2), ("t", 10))}
    await redis.hset(KEY, mapping={"R:0": 2 * 59, "T:0": 10 * 59, "P:0": now - 60, "O:0": now - 59, **buckets})
    assert await redis.object("encoding", KEY) == "listpack"
    assert await run(redis, ctx, "admit", now, 7) == [118, 590, now - 59]
    assert await run(redis, ctx, "admit", now, 1) == [119, 597, now - 59]  # the bucket of now read back
    assert await run(redis, ctx, "admit", now + 1, 3) == [118, 588, now - 58]  # second now - 59 left
    assert await redis.object("encoding", KEY) == "hashtable"
    assert await run(redis, ctx, "peek", now + 1) == [119, 591, now - 58]
    assert await redis.hget(KEY, f"r:{now}") == "2" and await redis.hget(KEY, f"t:{now}") == "8"
