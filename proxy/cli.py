"""The `metering-proxy` command line.

    metering-proxy serve [--demo]          run the proxy
    metering-proxy config check PATH       validate a config file (exit 1 on errors)
    metering-proxy demo-upstream           a fake OpenAI upstream on 127.0.0.1:9999

Every command takes `--config PATH` (default `$METERING_CONFIG`, then ./config.yaml).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from . import config as config_module
from . import logs


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("METERING_CONFIG") or "config.yaml")


def load(args: argparse.Namespace) -> config_module.Config:
    try:
        return config_module.load_config(config_path(args))
    except config_module.ConfigError as exc:
        print(f"{config_path(args)}: invalid config", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import serve

    logs.setup(args.log_level)
    config = load(args)
    on_started = None
    if args.demo:
        from .demo import demo_config, demo_started

        config, on_started = demo_config(config), demo_started
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(config, config_path(args) if not args.demo else None, on_started))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    return config_module.check_main(args.path or config_path(args))


def cmd_demo_upstream(args: argparse.Namespace) -> int:
    from .demo_upstream import main as demo_main

    demo_main(["--host", args.host, "--port", str(args.port)])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metering-proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file (default $METERING_CONFIG, then ./config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--demo", action="store_true", help="serve from a built-in fake OpenAI upstream and print a funded demo key"
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="configuration tools").add_subparsers(dest="config_command", required=True)
    check = config.add_parser("check", help="validate a config file")
    check.add_argument("path", nargs="?")
    check.set_defaults(func=cmd_config_check)

    demo = sub.add_parser("demo-upstream", help="run a fake OpenAI upstream (no OpenAI account needed)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=9999)
    demo.set_defaults(func=cmd_demo_upstream)
    return parser


def main(argv: list[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    return int(args.func(args))
