"""The `metering-proxy` command line.

    metering-proxy serve [--demo]                    run the proxy
    metering-proxy config check PATH                 validate a config file (exit 1 on errors)
    metering-proxy healthcheck                       exit 0 if the configured port answers /healthz
    metering-proxy demo-upstream                     a fake OpenAI upstream on 127.0.0.1:9999
    metering-proxy accounts create|get|update|list   accounts (as the admin API)
    metering-proxy keys create|update|show|list|revoke   API keys, their limits and spend
    metering-proxy credits grant|void                credit grants
    metering-proxy balance ACCOUNT                   balance and live grants
    metering-proxy ledger list|export ACCOUNT        ledger pages, CSV / JSON lines export
    metering-proxy usage ACCOUNT                     usage grouped by model and/or day
    metering-proxy reconcile                         check the ledger invariants (exit 1 on drift)
    metering-proxy webhooks dead list|replay         dead-lettered webhook events

Every command takes `--config PATH` (default `$METERING_CONFIG`, then ./config.yaml).
The admin commands print JSON (money as decimal strings) and talk to Redis directly
through the same service layer as the admin API: `redis.url` from the config or, with
an embedded Redis, the port the running proxy recorded in `data_dir/redis/port`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import commands, configfile, errors, logs
from .config import Config
from .embedded import DataDirInUse, port_file

if TYPE_CHECKING:  # the service stack is imported only by the commands that use it
    from .service import Service

Action = Callable[["Service", Any], Awaitable[int]]


class Unreachable(Exception):
    """No Redis to talk to: no redis.url and no running proxy's embedded Redis."""


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("METERING_CONFIG") or "config.yaml")


def load(args: argparse.Namespace) -> Config:
    try:
        return configfile.load_config(config_path(args))
    except configfile.ConfigError as exc:
        print(f"{config_path(args)}: invalid config", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import serve

    logs.setup(args.log_level)
    logs.install_hooks()
    config = load(args)
    on_started = None
    if args.demo:
        from .demo import Demo

        demo = Demo()
        config, on_started = demo.config(config), demo.started
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(config, config_path(args) if not args.demo else None, on_started))
    except DataDirInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    return configfile.check_main(args.path or config_path(args))


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 if the client listener of the config's `server.port` answers /healthz (for
    container healthchecks: the port comes from the config, not from the image)."""
    import urllib.request

    server = load(args).server
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{server.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            return 0 if resp.status == 200 else 1
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


def cmd_demo_upstream(args: argparse.Namespace) -> int:
    from .testing.upstream import main as demo_main

    demo_main(["--host", args.host, "--port", str(args.port)])
    return 0


# -- admin commands: one Redis connection, one service call, JSON out -----------------


def redis_target(config: Config) -> tuple[str, bool]:
    """(url, cluster): the configured Redis, or the running proxy's embedded one."""
    if config.redis is not None:
        return config.redis.url.get_secret_value(), config.redis.cluster
    path = port_file(config.data_dir / "redis")
    try:
        port = int(path.read_text().strip())
    except (OSError, ValueError):
        raise Unreachable(
            f"no redis.url in the config and no running proxy's embedded Redis ({path} is missing): "
            "start the proxy first or set redis.url"
        ) from None
    return f"redis://127.0.0.1:{port}/0", False


def cmd_admin(args: argparse.Namespace) -> int:
    config = load(args)
    try:
        url, cluster = redis_target(config)
    except Unreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(_admin(args, config, url, cluster))


async def _admin(args: Any, config: Config, url: str, cluster: bool) -> int:
    from .app import connect
    from .keys import KeyStore
    from .ledger import Ledger
    from .service import Service

    redis = connect(url, cluster)
    try:
        ledger = Ledger(redis, config)
        return int(await args.action(Service(redis, config, ledger, KeyStore(redis)), args))
    except errors.REDIS_DOWN + (errors.StoreUnavailable,):
        where = "redis.url" if config.redis else "the embedded Redis"
        print(f"error: cannot reach Redis ({where}): start the proxy first or set redis.url", file=sys.stderr)
        return 1
    except errors.ProxyError as err:
        print(err.to_body().decode(), file=sys.stderr)
        return 1
    finally:
        await redis.aclose()


def _common() -> argparse.ArgumentParser:
    # on every subcommand too, so `serve --config PATH` works; SUPPRESS keeps a value
    # given before the subcommand
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    return common


def _leaf(sub: Any, name: str, action: Action, help: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, parents=[_common()])
    parser.set_defaults(func=cmd_admin, action=action)
    return parser


def _group(sub: Any, name: str, help: str) -> Any:
    return sub.add_parser(name, help=help, parents=[_common()]).add_subparsers(dest=f"{name}_command", required=True)


def _account_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", help="a plan from the config")
    parser.add_argument("--overage-limit", help='USD below zero the balance may go, or "unlimited"')
    parser.add_argument("--status", choices=("active", "suspended"))
    parser.add_argument("--rpm", type=int, help="requests per minute override")
    parser.add_argument("--tpm", type=int, help="tokens per minute override")
    parser.add_argument("--auto-topup-threshold", help="USD; with --auto-topup-amount or --auto-topup-target")
    parser.add_argument("--auto-topup-amount", help="USD to request each time")
    parser.add_argument("--auto-topup-target", help="USD balance to top up to")
    parser.add_argument("--metadata", help="a JSON object")
    parser.add_argument("--low-balance-thresholds", help='USD amounts, comma-separated ("5,1")')
    fields = ("plan", "overage_limit_usd", "auto_topup", "rate_limits", "metadata", "low_balance_thresholds_usd")
    parser.add_argument("--clear", action="append", choices=fields, help="set a field to null (repeatable)")
    parser.add_argument("--json", help="a JSON body as the admin API takes it; flags override it")


def _add_account_commands(sub: Any) -> None:
    accounts = _group(sub, "accounts", "create, show and change accounts")
    create = _leaf(accounts, "create", commands.accounts_create, "create an account")
    create.add_argument("account")
    _account_flags(create)
    _leaf(accounts, "get", commands.accounts_get, "show an account").add_argument("account")
    update = _leaf(accounts, "update", commands.accounts_update, "change an account's settings")
    update.add_argument("account")
    _account_flags(update)
    _leaf(accounts, "list", commands.accounts_list, "list account ids")

    keys = _group(sub, "keys", "API keys")
    create = _leaf(keys, "create", commands.keys_create, "create an API key (printed once)")
    create.add_argument("account")
    _key_flags(create)
    update = _leaf(keys, "update", commands.keys_update, "change an API key's settings (at once)")
    update.add_argument("key_id")
    _key_flags(update)
    fields = ("allowed_models", "limit_usd", "limit_reset", "expires_at", "rate_limits")
    update.add_argument("--clear", action="append", choices=fields, help="set a field to null (repeatable)")
    _leaf(keys, "show", commands.keys_show, "an API key's settings, limit and spend").add_argument("key_id")
    _leaf(keys, "revoke", commands.keys_revoke, "revoke an API key").add_argument("key_id")
    _leaf(keys, "list", commands.keys_list, "list an account's keys").add_argument("account")


def _key_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name")
    parser.add_argument("--allowed-models", help="comma-separated; default: every model")
    parser.add_argument("--limit", help="USD the key may spend per period (reservations included)")
    parser.add_argument("--limit-reset", choices=("daily", "weekly", "monthly"), help="UTC periods; default: never")
    parser.add_argument("--expires-at", help="RFC 3339")
    parser.add_argument("--rpm", type=int, help="requests per minute, below the account's")
    parser.add_argument("--tpm", type=int, help="tokens per minute, below the account's")
    parser.add_argument("--body", help="a JSON body as the admin API takes it; flags override it")


def _add_money_commands(sub: Any) -> None:
    credits = _group(sub, "credits", "credit grants")
    grant = _leaf(credits, "grant", commands.credits_grant, "grant credits")
    grant.add_argument("account")
    grant.add_argument("amount", help="USD, e.g. 12.50")
    grant.add_argument("--kind", choices=("paid", "promotional"), required=True)
    grant.add_argument("--priority", type=int)
    grant.add_argument("--effective-at", help="RFC 3339")
    grant.add_argument("--expires-at", help="RFC 3339")
    grant.add_argument("--description")
    grant.add_argument("--idempotency-key")
    grant.add_argument("--cost-basis", help="per-unit cost basis, e.g. 0.9")
    adjust = _leaf(credits, "adjust", commands.credits_adjust, "settle overage debt (+) or charge by hand (-)")
    adjust.add_argument("account")
    adjust.add_argument("amount", help="signed USD, e.g. 50 or -2.5")
    adjust.add_argument("--description", required=True)
    adjust.add_argument("--idempotency-key")
    void = _leaf(credits, "void", commands.credits_void, "void a grant's remainder")
    void.add_argument("account")
    void.add_argument("grant_id")
    void.add_argument("--reason", default="")

    _leaf(sub, "balance", commands.show_balance, "an account's balance").add_argument("account")

    ledger = _group(sub, "ledger", "ledger entries")
    page = _leaf(ledger, "list", commands.ledger_list, "a page of entries, oldest first")
    page.add_argument("account")
    page.add_argument("--limit", type=int, default=100)
    page.add_argument("--cursor")
    export = _leaf(ledger, "export", commands.ledger_export, "every entry, as CSV or JSON lines")
    export.add_argument("account")
    export.add_argument("--format", choices=("csv", "jsonl"), default="jsonl")
    export.add_argument("--output", "-o", help="a file (default: stdout)")

    usage = _leaf(sub, "usage", commands.show_usage, "usage grouped by model and/or day")
    usage.add_argument("account")
    usage.add_argument("--from", dest="from_", help="RFC 3339 (default: 30 days before --to)")
    usage.add_argument("--to", help="RFC 3339 (default: now)")
    usage.add_argument("--group-by", default="model", help="comma-separated: model, day, key")

    _leaf(sub, "reconcile", commands.run_reconcile, "check every account's ledger invariants")

    dead = _group(_group(sub, "webhooks", "webhook delivery tools"), "dead", "events that failed every attempt")
    _leaf(dead, "list", commands.dead_list, "print dead events as JSON lines").add_argument("account", nargs="?")
    _leaf(dead, "replay", commands.dead_replay, "queue dead events for delivery again").add_argument(
        "account", nargs="?"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metering-proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file (default $METERING_CONFIG, then ./config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy", parents=[_common()])
    serve.add_argument(
        "--demo", action="store_true", help="serve from a built-in fake OpenAI upstream and print a funded demo key"
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    config = _group(sub, "config", "configuration tools")
    check = config.add_parser("check", help="validate a config file", parents=[_common()])
    check.add_argument("path", nargs="?")
    check.set_defaults(func=cmd_config_check)

    health = sub.add_parser("healthcheck", help="exit 0 if this config's proxy answers /healthz", parents=[_common()])
    health.add_argument("--timeout", type=float, default=2.0)
    health.set_defaults(func=cmd_healthcheck)

    demo = sub.add_parser("demo-upstream", help="run a fake OpenAI upstream (no OpenAI account needed)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=9999)
    demo.set_defaults(func=cmd_demo_upstream)

    _add_account_commands(sub)
    _add_money_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    return int(args.func(args))
