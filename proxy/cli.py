"""The `metering-proxy` command line.

    metering-proxy serve [--demo]                    run the proxy
    metering-proxy config check [PATH]               validate a config file (exit 1 on errors), warn
    metering-proxy config diff OLD NEW               what loading NEW in place of OLD would change
    metering-proxy config schema                     the JSON Schema of the YAML file
    metering-proxy healthcheck                       exit 0 if the configured port answers /healthz
    metering-proxy demo-upstream                     a fake OpenAI upstream on 127.0.0.1:9999
    metering-proxy prices show|list                  the price catalog: what a model costs
    metering-proxy accounts create|get|update|list   accounts (as the admin API)
    metering-proxy keys create|update|show|list|revoke   API keys, their limits and spend
    metering-proxy credits grant|void                credit grants
    metering-proxy balance ACCOUNT                   balance and live grants
    metering-proxy ledger list|export ACCOUNT        ledger pages, CSV / JSON lines export
    metering-proxy usage ACCOUNT                     usage grouped by model, day and/or key
    metering-proxy generations show ACCOUNT REQ_ID   one request: status, usage, cost charged
    metering-proxy reconcile                         check the ledger invariants (exit 1 on drift)
    metering-proxy webhooks dead list|replay         dead-lettered webhook events

Every command takes `--config PATH` (default `$METERING_CONFIG`, then ./config.yaml)
and `--json`: output is a readable table by default, the admin API's JSON (money as
decimal strings) with `--json`. The admin commands talk to Redis directly through the
same service layer as the admin API: `redis.url` from the config or, with an embedded
Redis, the port the running proxy recorded in `data_dir/redis/port`.

Exit codes: 0 done; 1 refused or found wrong (an error, a drift, an invalid config);
2 a bad command line; 3 Redis unreachable (nothing was checked or changed); 130
interrupted; 141 the reader of the output went away (`| head`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from . import commands, configfile, configtools, errors, logs, output
from .config import Config
from .embedded import DataDirInUse, port_file

if TYPE_CHECKING:  # the service stack is imported only by the commands that use it
    from .service import Service

Action = Callable[["Service", Any], Awaitable[int]]
EXIT_FAILED, EXIT_UNREACHABLE, EXIT_INTERRUPTED, EXIT_PIPE = 1, 3, 130, 141


class Unreachable(Exception):
    """No Redis to talk to: no redis.url and no running proxy's embedded Redis."""


class Unusable(Exception):
    """The config cannot be read or is invalid (said on stderr already): exit 1."""


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("METERING_CONFIG") or "config.yaml")


def load(args: argparse.Namespace) -> Config:
    path = config_path(args)
    if not path.exists():
        output.error(
            f"no config file {path}: pass --config PATH, set METERING_CONFIG, "
            "or start from the example (cp config.example.yaml config.yaml)"
        )
        raise Unusable(path)
    try:
        return configfile.load_config(path)
    except configfile.ConfigError as exc:
        print(f"{path}: invalid config", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        raise Unusable(path) from None


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
    return configtools.check(args.path or config_path(args))


def cmd_config_diff(args: argparse.Namespace) -> int:
    return configtools.diff(args.old, args.new)


def cmd_config_schema(args: argparse.Namespace) -> int:
    print(orjson.dumps(configtools.schema(), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 if the client listener of the config's `server.port` answers /healthz (for
    container healthchecks: the port comes from the config, not from the image)."""
    import urllib.request

    server = load(args).server
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{server.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            healthy, problem = resp.status == 200, f"HTTP {resp.status}"
    except OSError as exc:
        healthy, problem = False, str(exc)
    if output.JSON.get():
        output.emit({"healthy": healthy, "url": url, **({} if healthy else {"error": problem})})
    elif not healthy:
        print(f"unhealthy: {url}: {problem}", file=sys.stderr)
    return 0 if healthy else EXIT_FAILED


def cmd_prices(args: argparse.Namespace) -> int:
    """`prices show MODEL` (a configured model as priced, else the catalog's entry) and
    `prices list`: text, or JSON with --json. Reads no Redis and no network."""
    from . import prices, pricesheet

    try:
        if args.prices_command == "list":
            table = pricesheet.listing(args.provider or prices.DEFAULT_PROVIDER)
            if output.JSON.get():
                return output.emit(table)
            lines = pricesheet.listing_text(table)
        else:
            # a configured model as it is charged; with --provider (or no config) the catalog's entry
            given = args.config or os.environ.get("METERING_CONFIG") or config_path(args).exists()
            config = load(args) if given and args.provider is None else None
            sheet = pricesheet.show(args.model, args.provider, config)
            if output.JSON.get():
                return output.emit(sheet)
            lines = pricesheet.show_text(sheet)
    except prices.CatalogError as exc:
        output.error(str(exc))
        return 1
    output.write("\n".join(lines) + "\n", sys.stdout)
    return 0


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
        output.error(str(exc))
        return EXIT_UNREACHABLE
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
        output.error(f"cannot reach Redis ({where}): start the proxy first or set redis.url")
        return EXIT_UNREACHABLE
    except errors.ProxyError as err:
        said = ", ".join(f"{name}: {value}" for name, value in (("code", err.code), ("param", err.param)) if value)
        output.error(f"{err.message}{f' ({said})' if said else ''}", err.to_body())
        return EXIT_FAILED
    finally:
        await redis.aclose()


def _common() -> argparse.ArgumentParser:
    # on every subcommand too, so `serve --config PATH` works; SUPPRESS keeps a value
    # given before the subcommand
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, for scripts")
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
    parser.add_argument("--body", help="a JSON body as the admin API takes it; flags override it")


def _add_price_commands(sub: Any) -> None:
    group = _group(sub, "prices", "the price catalog (genai-prices, pinned): what a model costs")
    show = group.add_parser("show", help="a model's prices, context window and output cap", parents=[_common()])
    show.add_argument("model", help="a configured model, else a catalog model name")
    show.add_argument("--provider", help="look MODEL up in the catalog under this provider (default: openai)")
    listing = group.add_parser("list", help="a provider's catalog models and their main prices", parents=[_common()])
    listing.add_argument("--provider", help="a genai-prices provider id (default: openai)")
    for parser in (show, listing):
        parser.set_defaults(func=cmd_prices)


def _add_account_commands(sub: Any) -> None:
    accounts = _group(sub, "accounts", "create, show and change accounts")
    create = _leaf(accounts, "create", commands.accounts_create, "create an account")
    create.add_argument("account")
    _account_flags(create)
    _leaf(accounts, "get", commands.accounts_get, "show an account").add_argument("account")
    update = _leaf(accounts, "update", commands.accounts_update, "change an account's settings")
    update.add_argument("account")
    _account_flags(update)
    _leaf(accounts, "list", commands.accounts_list, "list accounts with their balances")

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
    page = _leaf(ledger, "list", commands.ledger_list, "a page of entries, oldest first (--order desc: newest first)")
    page.add_argument("account")
    page.add_argument("--limit", type=int, default=100)
    page.add_argument("--cursor")
    page.add_argument("--order", choices=("asc", "desc"), default="asc")
    export = _leaf(ledger, "export", commands.ledger_export, "every entry, as CSV or JSON lines")
    export.add_argument("account")
    export.add_argument("--format", choices=("csv", "jsonl"), default="jsonl")
    export.add_argument("--output", "-o", help="a file (default: stdout)")

    usage = _leaf(sub, "usage", commands.show_usage, "usage grouped by model, day and/or key")
    usage.add_argument("account")
    usage.add_argument("--from", dest="from_", help="RFC 3339 (default: 30 days before --to)")
    usage.add_argument("--to", help="RFC 3339 (default: now)")
    usage.add_argument("--group-by", default="model", help="comma-separated: model, day, key")

    generations = _group(sub, "generations", "one request, by its x-request-id")
    show = _leaf(generations, "show", commands.generations_show, "status, model, usage and the cost charged")
    show.add_argument("account")
    show.add_argument("request_id", help="an x-request-id, e.g. req_0123456789abcdef01234567")

    _leaf(sub, "reconcile", commands.run_reconcile, "check every account's ledger invariants")

    dead = _group(_group(sub, "webhooks", "webhook delivery tools"), "dead", "events that failed every attempt")
    _leaf(dead, "list", commands.dead_list, "list dead events").add_argument("account", nargs="?")
    _leaf(dead, "replay", commands.dead_replay, "queue dead events for delivery again").add_argument(
        "account", nargs="?"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metering-proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file (default $METERING_CONFIG, then ./config.yaml)")
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts (default: tables)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy", parents=[_common()])
    serve.add_argument(
        "--demo", action="store_true", help="serve from a built-in fake OpenAI upstream and print a funded demo key"
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    config = _group(sub, "config", "configuration tools")
    check = config.add_parser("check", help="validate a config file and warn", parents=[_common()])
    check.add_argument("path", nargs="?", help="default: --config")
    check.set_defaults(func=cmd_config_check)
    diff = config.add_parser("diff", help="what loading NEW in place of OLD would change", parents=[_common()])
    diff.add_argument("old")
    diff.add_argument("new")
    diff.set_defaults(func=cmd_config_diff)
    schema = config.add_parser("schema", help="print the JSON Schema of the config file", parents=[_common()])
    schema.set_defaults(func=cmd_config_schema)

    health = sub.add_parser("healthcheck", help="exit 0 if this config's proxy answers /healthz", parents=[_common()])
    health.add_argument("--timeout", type=float, default=2.0)
    health.set_defaults(func=cmd_healthcheck)

    demo = sub.add_parser("demo-upstream", help="run a fake OpenAI upstream (no OpenAI account needed)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=9999)
    demo.set_defaults(func=cmd_demo_upstream)

    _add_price_commands(sub)
    _add_account_commands(sub)
    _add_money_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    output.JSON.set(bool(args.json))
    try:
        return int(args.func(args))
    except Unusable:
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `| head` stopped reading: not an error of ours. Point stdout at /dev/null so the
        # interpreter's last flush at exit finds nowhere to fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE
