"""`metering-proxy config check|diff|schema`: a file validated with its warnings, what a
reload would change, and the JSON Schema of the YAML.

Warnings never fail a check (exit 0): prices that look like typos (a chat model whose
output is free, input dearer than output, cached input dearer than input) and secrets
whose `${VAR}` expanded to nothing. A diff compares the two files as validated (so
`2.5` and `"2.50"` are the same price), prints secrets only as "changed", and marks
what a reload keeps until a restart (`server`, `redis`: app.Proxy.reload).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, SecretStr

from . import output, pricesheet
from .config import Config, PriceConfig
from .configfile import ConfigError, Parsed, explain_catalog, explain_prices, read_config
from .configrefs import Loc, format_loc

SECRETS = frozenset(("api_key", "admin_token", "secret", "previous_secrets", "url"))  # `url`: redis.url's password
RESTART_SECTIONS = ("server", "redis")  # read once at start; a reload logs config_reload_partial


def check(path: str | Path) -> int:
    """0 if the file is valid (warnings or not), else 1 with every error and its line."""
    try:
        parsed = read_config(path)
    except ConfigError as exc:
        if output.JSON.get():
            output.emit({"ok": False, "errors": exc.errors, "warnings": []})
        else:
            sys.stderr.writelines(f"{line}\n" for line in exc.errors)
        return 1
    config, found = parsed.config, warnings(parsed)
    if output.JSON.get():
        counts = {"models": len(config.models), "upstreams": len(config.upstreams), "plans": len(config.plans)}
        output.emit(
            {
                "ok": True,
                "errors": [],
                "warnings": found,
                **counts,
                "prices": {name: pricesheet.show(name, config=config) for name in config.models},  # as `prices show`
                "catalog": explain_catalog(config),
            }
        )
        return 0
    sys.stderr.writelines(f"warning: {line}\n" for line in found)
    counts_text = ", ".join(
        f"{n} {noun}{'' if n == 1 else 's'}"
        for n, noun in ((len(config.models), "model"), (len(config.upstreams), "upstream"), (len(config.plans), "plan"))
    )
    print(f"ok: {counts_text}")
    print("\n".join(explain_prices(config) + explain_catalog(config)))
    return 0


def warnings(parsed: Parsed) -> list[str]:
    config = parsed.config
    found = []
    disabled = config.server.admin_disabled_reason
    if disabled:  # a visible choice, not a silent one
        found.append(f"the admin listener is disabled: {disabled}")
    for loc, expansion in parsed.expansions.items():
        if loc[-1] in SECRETS or (len(loc) > 1 and loc[-2] in SECRETS):
            if not expansion.value.strip() and loc != ("server", "admin_token"):  # that one: said above
                found.append(
                    f"{format_loc(loc)}: {expansion.written} expands to nothing: "
                    f"{_empty_means(loc)} (line {expansion.line})"
                )
    for name, model in config.models.items():
        if isinstance(model.price, PriceConfig):
            line = parsed.lines.get(("models", name, "price"), 0)
            problems = _price_problems(name, model.upstream_model, model.price)
            found += [f"models.{name}.price: {problem} (line {line})" for problem in problems]
    return found


def _empty_means(loc: Loc) -> str:
    if loc[-1] == "api_key":
        return "no key is sent upstream"
    return "is its variable set?"


def _price_problems(name: str, upstream_model: str | None, price: PriceConfig) -> Iterator[str]:
    """Prices that are legal but look like a typo."""
    output_price = price.output or Decimal(0)
    if output_price == 0 and "embed" not in (upstream_model or name).lower():
        yield "output is 0 on what looks like a chat model: its completions would be free"
    if output_price > 0 and price.input > output_price:
        yield f"input ({price.input}) is dearer than output ({output_price}): swapped?"
    if price.cached_input is not None and price.cached_input > price.input:
        yield f"cached_input ({price.cached_input}) is dearer than input ({price.input})"


# -- config diff ----------------------------------------------------------------------


def diff(old_path: str | Path, new_path: str | Path) -> int:
    """What loading NEW in place of OLD would change; 1 if either file is invalid."""
    configs = []
    for path in (old_path, new_path):
        try:
            configs.append(read_config(path).config)
        except ConfigError as exc:
            output.error(f"{path}: invalid config: " + "; ".join(exc.errors))
            return 1
    changes = list(_changes(_plain(configs[0]), _plain(configs[1]), ()))
    if output.JSON.get():
        output.emit({"changes": changes, "restart_needed": any(c["restart"] for c in changes)})
        return 0
    if not changes:
        print("no changes")
    for change in changes:
        old, new, path = change["old"], change["new"], change["path"]
        restart = "  (needs a restart: a reload keeps the old value)" if change["restart"] else ""
        if old is None:
            print(f"+ {path}: {_shown(new)}{restart}")
        elif new is None:
            print(f"- {path}: {_shown(old)}{restart}")
        else:
            print(f"~ {path}: {_shown(old)} -> {_shown(new)}{restart}")
    return 0


def _plain(config: Config) -> Any:
    """The validated config as plain values; secrets stay SecretStr (they compare by value)."""

    def plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return {name: plain(getattr(value, name)) for name in type(value).model_fields}
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, (Decimal, Path)):
            return str(value)
        return value

    return plain(config)


def _changes(old: Any, new: Any, loc: Loc) -> Iterator[dict[str, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            yield from _changes(old.get(key), new.get(key), (*loc, key))
    elif old != new:
        # SecretStr, or a field that may carry one (a webhook URL's token, redis.url's password)
        secret = isinstance(old, SecretStr) or isinstance(new, SecretStr) or loc[-1] in SECRETS
        yield {
            "path": format_loc(loc),
            "old": _secret(old) if secret else old,
            "new": _secret(new) if secret else new,
            "restart": loc[:1] in {(s,) for s in RESTART_SECTIONS},
        }


def _secret(value: Any) -> str | None:
    return None if value is None else "(secret)"


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


# -- config schema --------------------------------------------------------------------


def schema() -> dict[str, Any]:
    """The JSON Schema of the YAML file (draft 2020-12), for editors and linters."""
    document = Config.model_json_schema(mode="validation")
    # `price: catalog`, the short form, becomes `{source: catalog}` before validation (prices.resolve)
    document["$defs"]["ModelConfig"]["properties"]["price"] = {
        "anyOf": [
            {"const": "catalog", "description": "every price from the pinned catalog"},
            {"$ref": "#/$defs/PriceConfig"},
        ]
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **document}
