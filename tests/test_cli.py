"""The admin CLI, in-process against the test Redis (main() runs its own event loop,
so it is called from a worker thread)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from proxy.cli import build_parser, main
from proxy.embedded import EmbeddedRedis

from .conftest import BASE_CONFIG, deep_merge
from .helpers import suite_server


@pytest.fixture
def config_file(tmp_path: Path, redis_server: EmbeddedRedis, redis: Redis) -> Path:
    """A config pointing redis.url at the test Redis (flushed by the `redis` fixture)."""
    path = tmp_path / "config.yaml"
    extra = {"redis": {"url": redis_server.url}, "data_dir": str(tmp_path / "data"),
             "plans": {"pro": {"overage": {"limit_usd": None}}}}  # fmt: skip
    path.write_text(yaml.safe_dump(deep_merge(BASE_CONFIG, extra)))
    return path


class Cli:
    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys

    async def run(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, ["--config", str(self.config), *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    async def json(self, *argv: str) -> Any:
        code, out, err = await self.run(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(config_file: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(config_file, capsys)


async def test_accounts_keys_credits_round_trip(cli: Cli) -> None:
    created = await cli.json("accounts", "create", "acme", "--metadata", '{"crm": "c_9"}', "--overage-limit", "1.5")
    assert created["id"] == "acme" and created["metadata"] == {"crm": "c_9"}
    assert created["overage_limit_usd"] == "1.500000"
    assert [a["id"] for a in (await cli.json("accounts", "list"))["data"]] == ["acme"]
    updated = await cli.json("accounts", "update", "acme", "--plan", "pro", "--rpm", "7", "--status", "suspended")
    assert updated["plan"] == "pro" and updated["rate_limits"]["rpm"] == 7 and updated["status"] == "suspended"
    cleared = await cli.json("accounts", "update", "acme", "--clear", "plan", "--clear", "rate_limits")
    assert cleared["plan"] is None and cleared["rate_limits"]["override"] is False
    topped = await cli.json("accounts", "update", "acme", "--auto-topup-threshold", "1", "--auto-topup-amount", "10")
    assert topped["auto_topup"] == {"threshold_usd": "1.000000", "amount_usd": "10.000000"}

    key = await cli.json("keys", "create", "acme", "--name", "ci", "--allowed-models", "gpt-4o,gpt-4o-mini")
    assert key["key"].startswith("sk-mp-") and key["allowed_models"] == ["gpt-4o", "gpt-4o-mini"]
    listed = await cli.json("keys", "list", "acme")
    assert [k["id"] for k in listed["data"]] == [key["id"]] and "key" not in listed["data"][0]
    assert (await cli.json("keys", "revoke", key["id"]))["revoked"] is True

    grant = await cli.json("credits", "grant", "acme", "12.5", "--kind", "paid", "--idempotency-key", "inv-1")
    assert grant["amount_usd"] == "12.500000" and grant["status"] == "active"
    code, out, err = await cli.run(
        "credits", "grant", "acme", "12.5", "--kind", "paid", "--idempotency-key", "inv-1", "--json"
    )
    assert code == 0 and json.loads(out) == grant and "existing grant" in err
    promo = await cli.json("credits", "grant", "acme", "2", "--kind", "promotional", "--expires-at", "2999-01-01")
    assert promo["expires_at"] == "2999-01-01T00:00:00.000Z"
    balance = await cli.json("balance", "acme")
    assert balance["balance_usd"] == "14.500000" and len(balance["grants"]) == 2
    voided = await cli.json("credits", "void", "acme", promo["id"], "--reason", "refund")
    assert voided["status"] == "voided"
    assert (await cli.json("balance", "acme"))["balance_usd"] == "12.500000"

    page = await cli.json("ledger", "list", "acme", "--limit", "2")
    assert [e["type"] for e in page["entries"]] == ["grant", "grant"] and page["next_cursor"]
    rest = await cli.json("ledger", "list", "acme", "--limit", "2", "--cursor", page["next_cursor"])
    assert [e["type"] for e in rest["entries"]] == ["void"] and rest["next_cursor"] is None
    usage = await cli.json("usage", "acme", "--group-by", "model,day")
    assert usage["account_id"] == "acme" and usage["groups"] == []


async def test_keys_limits_expiry_and_rate_limits(cli: Cli) -> None:
    await cli.json("accounts", "create", "acme")
    key = await cli.json("keys", "create", "acme", "--name", "ci", "--limit", "2.5", "--limit-reset", "weekly",
                         "--expires-at", "2999-01-01", "--rpm", "5", "--allowed-models", "gpt-4o")  # fmt: skip
    assert key["key"].startswith("sk-mp-") and key["limit_usd"] == "2.500000" and key["limit_reset"] == "weekly"
    assert key["limit_remaining_usd"] == "2.500000" and key["expires_at"] == "2999-01-01T00:00:00.000Z"
    assert key["rate_limits"] == {"rpm": 5, "tpm": None} and key["allowed_models"] == ["gpt-4o"]
    updated = await cli.json("keys", "update", key["id"], "--limit", "1", "--tpm", "900", "--clear", "expires_at")
    assert updated["limit_usd"] == "1.000000" and updated["limit_reset"] == "weekly"  # the rest is kept
    assert updated["rate_limits"] == {"rpm": 5, "tpm": 900} and updated["expires_at"] is None
    cleared = await cli.json("keys", "update", key["id"], "--clear", "limit_usd", "--clear", "rate_limits",
                             "--clear", "allowed_models", "--name", "renamed")  # fmt: skip
    assert cleared["limit_usd"] is None and cleared["limit_remaining_usd"] is None and cleared["name"] == "renamed"
    assert cleared["rate_limits"] == {"rpm": None, "tpm": None} and cleared["allowed_models"] is None
    shown = await cli.json("keys", "show", key["id"])
    assert shown == cleared and shown["usage_usd"] == dict.fromkeys(("total", "daily", "weekly", "monthly"), "0.000000")
    assert (await cli.json("keys", "list", "acme"))["data"] == [shown]
    await cli.json("keys", "revoke", key["id"])
    assert (await cli.json("keys", "show", key["id"]))["status"] == "revoked"
    code, _, err = await cli.run("keys", "update", key["id"], "--limit", "-1", "--json")
    assert code == 1 and json.loads(err)["error"]["param"] == "limit_usd"
    code, _, err = await cli.run("keys", "create", "acme", "--expires-at", "2001-01-01")
    assert code == 1 and "in the future" in err
    given = '{"limit_usd": "3", "limit_reset": "daily"}'
    body = await cli.json("keys", "create", "acme", "--body", given, "--limit", "4")
    assert body["limit_usd"] == "4.000000" and body["limit_reset"] == "daily"  # flags override the body


async def test_errors_exit_1_with_openai_shaped_json(cli: Cli) -> None:
    code, out, err = await cli.run("balance", "ghost", "--json")
    assert code == 1 and out == "" and json.loads(err)["error"]["code"] == "not_found"
    await cli.json("accounts", "create", "acme")
    code, _, err = await cli.run("credits", "grant", "acme", "0.0000001", "--kind", "paid", "--json")
    assert code == 1 and json.loads(err)["error"]["param"] == "amount_usd"
    code, _, err = await cli.run("accounts", "update", "acme", "--plan", "gold")
    assert code == 1 and "Unknown plan" in err
    code, _, err = await cli.run("accounts", "update", "acme", "--metadata", "{not json")
    assert code == 1 and "could not parse" in err
    code, _, err = await cli.run("accounts", "create", "acme")
    assert code == 1 and "account_exists" in err


async def test_ledger_export_csv_and_jsonl(cli: Cli, tmp_path: Path) -> None:
    await cli.json("accounts", "create", "acme")
    grant = await cli.json("credits", "grant", "acme", "3", "--kind", "paid", "--description", "pack, large")
    code, out, _ = await cli.run("ledger", "export", "acme", "--format", "jsonl")
    (entry,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and entry["type"] == "grant" and entry["amount_usd"] == "3.000000"
    assert entry["grant_id"] == grant["id"] and entry["account_id"] == "acme"
    target = tmp_path / "ledger.csv"
    code, out, _ = await cli.run("ledger", "export", "acme", "--format", "csv", "--output", str(target))
    assert code == 0 and out == ""
    header, row = target.read_bytes().decode().split("\r\n")[:2]
    assert header == (
        "id,created_at,type,amount_usd,balance_usd,grant_id,request_id,model,input_tokens,cached_input_tokens,"
        "output_tokens,reasoning_tokens,estimated,downgraded_from,description,price_source"
    )
    assert row == f'{entry["id"]},{entry["created_at"]},grant,3.000000,3.000000,{grant["id"]},,,,,,,,,"pack, large",'


async def test_embedded_redis_port_file(tmp_path: Path, redis_server: EmbeddedRedis, redis: Redis,
                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path = tmp_path / "embedded.yaml"
    path.write_text(yaml.safe_dump(deep_merge(BASE_CONFIG, {"data_dir": str(tmp_path / "data")})))
    cli = Cli(path, capsys)
    code, out, err = await cli.run("accounts", "list")
    assert code == 3 and out == "" and "start the proxy first or set redis.url" in err
    (tmp_path / "data" / "redis").mkdir(parents=True)
    (tmp_path / "data" / "redis" / "port").write_text(f"{redis_server.port}\n")  # as a running proxy leaves it
    assert (await cli.json("accounts", "list"))["data"] == []  # reached the embedded Redis


async def test_embedded_server_records_and_removes_its_port(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", binary=suite_server())
    await server.start()
    try:
        assert (tmp_path / "redis" / "port").read_text().strip() == str(server.port)
    finally:
        server.stop()
    assert not (tmp_path / "redis" / "port").exists()


def test_config_flag_works_after_the_subcommand(tmp_path: Path) -> None:
    assert build_parser().parse_args(["serve", "--config", "a.yaml"]).config == "a.yaml"
    assert build_parser().parse_args(["--config", "b.yaml", "serve"]).config == "b.yaml"
    assert build_parser().parse_args(["reconcile", "--config", "c.yaml"]).config == "c.yaml"


def test_config_check_still_works(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(config_file)]) == 0
    assert capsys.readouterr().out.startswith("ok: 4 models")


# -- for people: tables by default, --json for scripts, clear errors -----------------


async def test_tables_by_default(cli: Cli) -> None:
    await cli.json("accounts", "create", "acme", "--plan", "pro")
    await cli.json("accounts", "create", "beta")
    await cli.json("credits", "grant", "acme", "12.5", "--kind", "paid")
    code, out, _ = await cli.run("accounts", "list")
    header, acme, beta = out.splitlines()[-3:]
    assert code == 0 and header.split() == ["ID", "STATUS", "PLAN", "TIER", "BALANCE_USD", "AVAILABLE_USD",
                                            "RESERVED_USD", "OVERAGE_USD"]  # fmt: skip
    assert acme.split()[:5] == ["acme", "active", "pro", "free", "12.500000"]
    assert beta.split()[:5] == ["beta", "active", "-", "free", "0.000000"]
    code, out, _ = await cli.run("balance", "acme")
    lines = out.splitlines()
    assert code == 0 and "balance_usd    12.500000" in lines and "grants:" in lines
    code, out, _ = await cli.run("ledger", "list", "acme")
    assert out.splitlines()[3].split()[:5] == ["ID", "CREATED_AT", "TYPE", "AMOUNT_USD", "BALANCE_USD"]
    assert out.splitlines()[3].split()[-2:] == ["KEY_ID", "GRANT_ID"]  # which key spent it
    await cli.json("credits", "grant", "acme", "1", "--kind", "promotional")
    newest = await cli.json("ledger", "list", "acme", "--order", "desc", "--limit", "1")  # the latest first
    assert [e["amount_usd"] for e in newest["entries"]] == ["1.000000"] and newest["next_cursor"]
    older = await cli.json("ledger", "list", "acme", "--order", "desc", "--cursor", newest["next_cursor"])
    assert [e["amount_usd"] for e in older["entries"]] == ["12.500000"]
    assert out.splitlines()[4].split()[2:5] == ["grant", "12.500000", "12.500000"]
    # keys: what a person compares across keys (no api_key/account columns, spend not cut off)
    key = await cli.json(
        "keys", "create", "acme", "--name", "ci", "--limit", "2", "--limit-reset", "daily", "--tpm", "40000"
    )
    code, out, _ = await cli.run("keys", "list", "acme")
    header, row = out.splitlines()
    assert code == 0 and header.split() == ["ID", "NAME", "STATUS", "LIMIT_USD", "LIMIT_RESET", "LIMIT_REMAINING_USD",
                                            "USAGE_USD.TOTAL", "RESERVED_USD", "EXPIRES_AT", "ALLOWED_MODELS",
                                            "RATE_LIMITS"]  # fmt: skip
    assert row.split() == [key["id"], "ci", "active", "2.000000", "daily", "2.000000", "0.000000", "0.000000", "-",
                           "-", "rpm=-", "tpm=40000"]  # fmt: skip


async def test_accounts_list_json_has_the_balances(cli: Cli) -> None:
    await cli.json("accounts", "create", "acme")
    await cli.json("credits", "grant", "acme", "2", "--kind", "promotional")
    [row] = (await cli.json("accounts", "list"))["data"]  # each as GET /admin/v1/accounts lists it
    expected = {"id": "acme", "status": "active", "plan": None, "tier": "free", "balance_usd": "2.000000",
                "available_usd": "2.000000", "reserved_usd": "0.000000", "overage_usd": "0.000000"}  # fmt: skip
    assert {name: row.get(name) for name in expected} == expected and "grants" not in row


def test_every_command_takes_json() -> None:
    """Every command that prints a result takes --json, before or after its name."""
    import argparse

    def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
        [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)] or [None]
        if sub is None:
            return [(path, parser)]
        return [leaf for name, child in sub.choices.items() for leaf in leaves(child, (*path, name))]

    found = leaves(build_parser(), ())
    servers = {("serve",), ("demo-upstream",)}  # they run until stopped and print logs
    assert len(found) > 20
    for path, parser in found:
        if path not in servers:
            assert "--json" in parser._option_string_actions, path
    assert build_parser().parse_args(["--json", "reconcile"]).json is True
    assert build_parser().parse_args(["reconcile", "--json"]).json is True


async def test_errors_are_one_readable_line(cli: Cli) -> None:
    code, out, err = await cli.run("balance", "ghost")
    assert (code, out, err) == (1, "", "error: No account 'ghost'. (code: not_found)\n")
    await cli.json("accounts", "create", "acme")
    code, _, err = await cli.run("credits", "grant", "acme", "0.0000001", "--kind", "paid")
    assert (code, err) == (
        1,
        "error: Invalid request: amount_usd: more precision than 1e-6 USD: '0.0000001' (param: amount_usd)\n",
    )


async def test_a_missing_config_file_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(main, ["--config", str(tmp_path / "nope.yaml"), "accounts", "list"])
    err = capsys.readouterr().err
    assert code == 1 and "no config file" in err and "cp config.example.yaml config.yaml" in err


async def test_reconcile_json_and_exit_codes(cli: Cli, redis: Redis) -> None:
    from proxy import keyspace

    await cli.json("accounts", "create", "acme")
    await cli.json("credits", "grant", "acme", "5", "--kind", "paid")
    assert await cli.json("reconcile") == {"ok": True, "accounts": 1, "drifting": [], "drifts": []}
    await redis.hincrby(keyspace.account("acme", "acct"), "balance", 1)
    code, out, _ = await cli.run("reconcile", "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["drifting"] == ["acme"]
    assert report["drifts"][0] == {"account_id": "acme", "check": "balance == sum(ledger amounts)",
                                   "expected": "5.000000", "found": "5.000001"}  # fmt: skip


async def test_dead_letters_as_a_table(cli: Cli, redis: Redis) -> None:
    from proxy import keyspace

    dead = {"id": "evt_acme_1", "type": "credits.granted", "ts": 0, "data": {"amount_usd": "5000000"},
            "tries": 8, "error": "HTTP 500", "dead_at": 1_700_000_000_000}  # fmt: skip
    await redis.rpush(keyspace.dead_letters("acme"), json.dumps(dead))
    await redis.sadd(keyspace.DEAD_LETTERS, "acme")
    code, out, _ = await cli.run("webhooks", "dead", "list")
    header, row = out.splitlines()[-2:]
    assert code == 0 and header.split() == ["ACCOUNT_ID", "ID", "TYPE", "TRIES", "ERROR", "DEAD_AT"]
    assert row.split() == ["acme", "evt_acme_1", "credits.granted", "8", "HTTP", "500", "2023-11-14T22:13:20.000Z"]
    assert (await cli.json("webhooks", "dead", "replay")) == {"replayed": 1}


async def test_healthcheck_json(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await cli.run("healthcheck", "--json", "--timeout", "0.5")  # nothing listens on port 0's
    report = json.loads(out)
    assert code == 1 and report["healthy"] is False and report["url"].endswith("/healthz") and report["error"]
