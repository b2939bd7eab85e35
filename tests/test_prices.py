"""The price catalog (proxy.prices on the pinned genai-prices): `price: catalog` prices
equal genai-prices' own figures (computed with its own calc_price), service and
long-context tiers included; the YAML's fields win; an unknown name is a config error
naming the closest matches; a request is charged the catalog price and its ledger
entry names the catalog; `prices show|list` and `config check` say what applies."""

from __future__ import annotations

import csv
import io
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import genai_prices
import pytest
import yaml
from genai_prices import data_snapshot
from pydantic import ValidationError

from proxy import prices
from proxy.catalog import Catalog
from proxy.cli import main
from proxy.config import Config, PriceConfig
from proxy.configfile import ConfigError, load_config, parse_config
from proxy.configtools import check as check_main
from proxy.money import MICRO, Usage
from proxy.testing.upstream import DemoUpstream

from .conftest import ADMIN_TOKEN, BASE_CONFIG, Running, deep_merge
from .helpers import entries

UPSTREAMS = {"openai": {"base_url": "https://api.openai.com/v1"},
             "claude": {"base_url": "https://api.anthropic.com/v1", "provider": "anthropic"},
             "deepseek": {"base_url": "https://api.deepseek.com/v1", "provider": "deepseek"}}  # fmt: skip


def config_of(models: dict[str, Any], **extra: Any) -> Config:
    return parse_config(yaml.safe_dump({"upstreams": UPSTREAMS, "models": models, **extra}), env={})


def genai_cost(model: str, provider: str, usage: Usage, tier: str | None = None, at: datetime | None = None) -> Decimal:
    """genai-prices' own price of `usage`, in micro-USD (exact)."""
    theirs = genai_prices.Usage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cached_input_tokens,
        input_audio_tokens=usage.audio_input_tokens,
        output_tokens=usage.output_tokens,
        output_audio_tokens=usage.audio_output_tokens,
    )
    context = {"service_tier": tier} if tier else None
    found = genai_prices.calc_price(
        theirs, model, provider_id=provider, price_context=context, genai_request_timestamp=at
    )
    return found.total_price * MICRO


USAGES = (
    Usage(input_tokens=1000, output_tokens=50),
    Usage(input_tokens=1200, cached_input_tokens=300, output_tokens=70, reasoning_tokens=20),
    Usage(input_tokens=900, audio_input_tokens=400, output_tokens=100, audio_output_tokens=60),
    Usage(input_tokens=300_000, cached_input_tokens=100_000, output_tokens=2_000),  # past 272k / 200k thresholds
)


@pytest.mark.parametrize(
    ("model", "upstream", "tiers"),
    [
        ("gpt-4o", "openai", {"priority"}),
        ("gpt-4o-mini", "openai", {"priority"}),
        ("o3-mini", "openai", set()),
        ("gpt-4.1", "openai", {"priority"}),
        ("gpt-5", "openai", {"priority", "flex"}),
        ("gpt-5.4", "openai", {"priority", "flex"}),  # long-context prices at every tier
        ("gpt-audio", "openai", set()),  # audio prices of their own
        ("claude-sonnet-4-5", "claude", set()),  # another provider, with a long-context tier
    ],
)
def test_catalog_prices_equal_genai_prices_own_figures(model: str, upstream: str, tiers: set[str]) -> None:
    provider = UPSTREAMS[upstream].get("provider", "openai")
    price = Catalog(config_of({model: {"upstream": upstream, "price": "catalog"}})).route(model).price
    assert {t for t in ("priority", "flex", "scale") if price.offers(t)} == tiers
    for usage in USAGES:
        assert price.exact_cost(usage) == genai_cost(model, provider, usage)
        assert (
            price.exact_cost(usage, "default") == price.exact_cost(usage, "auto") == genai_cost(model, provider, usage)
        )
        for tier in tiers:
            assert price.exact_cost(usage, tier) == genai_cost(model, provider, usage, tier)
            assert genai_cost(model, provider, usage, tier) != genai_cost(model, provider, usage)  # a tier of its own
            reported = Usage(**{**usage.as_dict(), "service_tier": tier})  # the tier the upstream reports wins
            assert price.exact_cost(reported, None) == genai_cost(model, provider, usage, tier)


def test_time_of_day_prices_are_charged_at_the_dearest_hour() -> None:
    price = Catalog(
        config_of({"chat": {"upstream": "deepseek", "upstream_model": "deepseek-chat", "price": "catalog"}})
    )
    usage = USAGES[1]
    today = datetime.now(UTC).date()
    hours = [datetime(today.year, today.month, today.day, h, 30, tzinfo=UTC) for h in range(24)]
    theirs = [genai_cost("deepseek-chat", "deepseek", usage, at=at) for at in hours]
    assert price.route("chat").price.exact_cost(usage) == max(theirs) > min(theirs)  # never below the catalog


def test_the_context_window_comes_from_the_catalog_and_the_catalog_is_the_prices_source() -> None:
    config = config_of({"gpt-4o": {"upstream": "openai", "price": "catalog"},
                        "own": {"upstream": "openai", "price": {"input": "1"}}})  # fmt: skip
    assert config.models["gpt-4o"].max_input_tokens == 128_000
    assert config.models["gpt-4o"].max_output_tokens is None  # genai-prices has no output caps
    catalog = Catalog(config)
    assert catalog.route("gpt-4o").context_window == 128_000
    assert catalog.route("gpt-4o").price_source == prices.CATALOG == f"genai-prices {genai_prices.__version__}"
    assert catalog.route("own").price_source is None


def test_the_yaml_fields_win_over_the_catalog() -> None:
    price = {"source": "catalog", "output": "12.00", "service_tiers": {"priority": {"output": "20"}}}
    config = config_of(
        {
            "gpt-4o": {"upstream": "openai", "price": price, "max_input_tokens": 1000, "max_output_tokens": 64},
            "no-priority": {"upstream": "openai", "upstream_model": "gpt-4o",
                            "price": {"source": "catalog", "cached_input": None, "service_tiers": {"priority": None}}},
            "marked-up": {"upstream": "openai", "upstream_model": "gpt-4o", "price": "catalog", "markup_percent": 10},
        }
    )  # fmt: skip
    catalog = Catalog(config)
    route = catalog.route("gpt-4o")
    assert (route.price.input, route.price.cached_input, route.price.output) == (Decimal("2.5"), Decimal("1.25"), 12)
    priority = route.price.tier("priority").rates
    assert (priority.input, priority.cached_input, priority.output) == (Decimal("4.25"), Decimal("2.125"), 20)
    assert (route.context_window, route.output_limit) == (1000, 64)
    plain = catalog.route("no-priority").price  # null: the catalog's tier is not offered, cached back at `input`
    assert not plain.offers("priority") and plain.cached_input == plain.input == Decimal("2.5")
    usage = Usage(input_tokens=1000, cached_input_tokens=200, output_tokens=30)
    assert catalog.route("marked-up").price.exact_cost(usage) == genai_cost("gpt-4o", "openai", usage) * Decimal("1.1")


def test_an_unknown_model_is_a_config_error_on_its_line_naming_the_closest_matches() -> None:
    text = """\
upstreams:
  openai: {base_url: "https://api.openai.com/v1"}
  claude: {base_url: "https://api.anthropic.com/v1", provider: antropic}
models:
  gpt-4o: {upstream: openai, price: catalog}
  gpt-4oo:
    upstream: openai
    price: {source: catalog, output: "1"}
  tts-1: {upstream: openai, price: catalog}
  sonnet: {upstream: claude, price: catalog}
  typo: {upstream: openai, price: catalogue}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    errors = info.value.errors
    assert len(errors) == 5, errors  # one each: no echo from the prices the catalog could not fill
    assert errors[0].startswith("upstreams.claude.provider: unknown provider 'antropic' in genai-prices")
    assert "closest: anthropic" in errors[0] and errors[0].endswith("(line 3)")
    assert errors[1].startswith("models.gpt-4oo.price: genai-prices") and "no model 'gpt-4oo'" in errors[1]
    assert "closest: gpt-4o," in errors[1] and errors[1].endswith("(line 8)")
    assert "prices openai/tts-1 by input_mchars, not by input tokens" in errors[2] and "(line 9)" in errors[2]
    assert errors[3] == (
        "models.sonnet.price: not priced from the catalog: upstream 'claude' has an unknown provider (line 10)"
    )
    assert errors[4] == "models.typo.price: must be a mapping of prices, or `catalog` (line 11)"


def test_config_check_names_the_closest_matches_and_the_catalog_that_priced_what(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"upstreams": UPSTREAMS, "models": {"gpt-5-mini": {"upstream": "openai",
                                    "upstream_model": "gpt-5-minii", "price": "catalog"}}}))  # fmt: skip
    assert check_main(path) == 1
    err = capsys.readouterr().err
    assert "models.gpt-5-mini.price:" in err and "'gpt-5-minii'" in err and "closest: gpt-5-mini" in err
    models = {"gpt-4o": {"upstream": "openai", "price": "catalog"},
              "sonnet": {"upstream": "claude", "upstream_model": "claude-sonnet-4-5", "price": "catalog"},
              "own": {"upstream": "openai", "price": {"input": "1"}}}  # fmt: skip
    path.write_text(yaml.safe_dump({"upstreams": UPSTREAMS, "models": models}))
    assert check_main(path) == 0
    out = capsys.readouterr().out
    assert f"{prices.CATALOG} (bundled, never updated at run time; prices of " in out
    assert "  gpt-4o: openai/gpt-4o\n" in out and "  sonnet: anthropic/claude-sonnet-4-5\n" in out
    assert "own:" not in out.split(prices.CATALOG)[1]  # priced by the config
    assert "not metered here: cache_write_mtok 3.75" in out  # what OpenAI-shaped usage cannot tell


def test_config_validated_directly_is_filled_too() -> None:
    data = {"upstreams": UPSTREAMS, "models": {"o3-mini": {"upstream": "openai", "price": "catalog"}}}
    assert Config.model_validate(data).models["o3-mini"].price.input == Decimal("1.1")
    assert data["models"]["o3-mini"]["price"] == "catalog"  # the caller's data is left alone
    with pytest.raises(ValidationError, match="no model 'o3-minii'"):
        Config.model_validate(deep_merge(data, {"models": {"o3-mini": {"upstream_model": "o3-minii"}}}))


def test_only_the_bundled_data_is_read_never_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """genai-prices swaps in prices fetched by its updater (`set_custom_snapshot`) for
    every caller; ours read the package's own data, with every socket refused."""
    bundled = prices.lookup("gpt-4o").price
    fetched = data_snapshot.DataSnapshot(providers=[], from_auto_update=True)  # what an update would install
    monkeypatch.setattr(data_snapshot, "_custom_snapshot", fetched)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the price catalog opened a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    prices.snapshot.cache_clear()
    prices._lookup.cache_clear()
    try:
        assert prices.lookup("gpt-4o").price == bundled
        assert config_of({"gpt-4o": {"upstream": "openai", "price": "catalog"}}).models["gpt-4o"].price.input == 2.5
    finally:
        prices.snapshot.cache_clear()
        prices._lookup.cache_clear()


def test_every_catalog_model_converts_or_is_refused_with_a_reason() -> None:
    """All ~2,300 models of every provider: a valid price, or a CatalogError saying why."""
    converted = refused = 0
    for provider in prices.snapshot().providers:
        for model_id, entry in prices.models(provider.id):
            if isinstance(entry, prices.CatalogError):
                assert prices.SET_IT in str(entry) and prices.CATALOG in str(entry), (model_id, entry)
                refused += 1
            else:
                PriceConfig.model_validate(entry.price)
                converted += 1
    assert converted > 2000 and refused < converted / 5


# -- through the proxy ----------------------------------------------------------------


@pytest.fixture
async def upstream(upstream_server: DemoUpstream) -> AsyncIterator[DemoUpstream]:
    """conftest's, reset afterwards too: the next module's tests (test_ratelimits) take
    the session's upstream as they find it."""
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()


async def test_a_request_is_charged_the_catalog_price_and_its_entry_names_it(
    start_proxy: Any, upstream: DemoUpstream
) -> None:
    running: Running = await start_proxy(
        {"models": {"gpt-4.1": {"upstream": "openai", "price": "catalog"}, "gpt-4o": {"price": "catalog"}}}
    )
    key = await running.account("acme", "10")
    client = running.client(key)
    upstream.fault.prompt_tokens, upstream.fault.cached_tokens, upstream.fault.output_tokens = 1000, 400, 20
    usage = Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=20)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "hi"}], max_tokens=20
    )
    assert raw.headers["x-metering-cost-usd"] == usd(genai_cost("gpt-4.1", "openai", usage))
    upstream.fault.service_tier = "priority"  # gpt-4o, upstream_model gpt-4o-2024-08-06: the catalog's gpt-4o
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=20, service_tier="priority"
    )
    assert raw.headers["x-metering-cost-usd"] == usd(genai_cost("gpt-4o-2024-08-06", "openai", usage, "priority"))
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    charged = [e for e in await entries(running.state.redis, "acme") if e["type"] == "usage"]
    assert [(e["model"], e.get("price_source")) for e in charged] == [
        ("gpt-4.1", prices.CATALOG), ("gpt-4o", prices.CATALOG), ("gpt-4o-mini", None),  # YAML prices: no field
    ]  # fmt: skip
    status, page = await running.admin("GET", "/admin/v1/accounts/acme/ledger")
    assert status == 200 and [e.get("price_source") for e in page["entries"] if e["type"] == "usage"] == [
        prices.CATALOG, prices.CATALOG, None,
    ]  # fmt: skip
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as session:
        async with session.get(f"{running.admin_url}/admin/v1/accounts/acme/ledger/export?format=csv") as resp:
            rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [r["price_source"] for r in rows if r["type"] == "usage"] == [prices.CATALOG, prices.CATALOG, ""]


async def test_an_embedding_batch_longer_than_the_window_is_served(start_proxy: Any, upstream: DemoUpstream) -> None:
    """The catalog's 8,192 of text-embedding-3-small is per input: a request of several
    inputs may hold more (OpenAI takes up to 2,048 of them), so it is no max_input_tokens."""
    running: Running = await start_proxy({"models": {"text-embedding-3-small": {"price": "catalog"}}})
    assert running.state.catalog.route("text-embedding-3-small").context_window is None
    key = await running.account("acme", "10")
    upstream.fault.prompt_tokens = 12_000
    await running.client(key).embeddings.create(model="text-embedding-3-small", input=["word " * 6000] * 2)
    (entry,) = [e for e in await entries(running.state.redis, "acme") if e["type"] == "usage"]
    assert entry["amount"] == "-240" and entry["price_source"] == prices.CATALOG  # 12,000 x 0.02 micro-USD


def usd(micro: Decimal) -> str:
    whole = int(micro.to_integral_value(rounding=ROUND_HALF_UP))
    return f"{whole // 1_000_000}.{whole % 1_000_000:06d}"


async def test_a_reload_to_catalog_prices_applies(
    start_proxy: Any, redis_server: Any, upstream: DemoUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    data = deep_merge(BASE_CONFIG, {"redis": {"url": redis_server.url}, "data_dir": str(tmp_path / "data"),
                                    "upstreams": {"openai": {"base_url": upstream.base_url}}})  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    running = await start_proxy(config=load_config(path), config_path=path)
    key = await running.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.output_tokens = 1000, 10

    async def cost() -> str:
        raw = await running.client(key).chat.completions.with_raw_response.create(
            model="o3-mini", messages=[{"role": "user", "content": "x"}], max_tokens=10
        )
        return str(raw.headers["x-metering-cost-usd"])

    assert await cost() == "0.001144"  # 1000 x 1.10 + 10 x 4.40, the YAML's prices
    catalog_priced = deep_merge(data, {"models": {"o3-mini": {"price": {"source": "catalog", "output": "8.80"}}}})
    path.write_text(yaml.safe_dump(catalog_priced))
    assert await running.proxy.reload() is True
    assert await cost() == "0.001188"  # the catalog's input (1.10), the YAML's output (8.80)
    assert running.state.catalog.route("o3-mini").context_window == 200_000
    path.write_text(yaml.safe_dump(deep_merge(data, {"models": {"o3-mini": {"upstream_model": "o3-minii",
                                                                            "price": "catalog"}}})))  # fmt: skip
    assert await running.proxy.reload() is False  # refused: the old config keeps serving
    assert await cost() == "0.001188"
    (last,) = [e for e in await entries(running.state.redis, "acme") if e["type"] == "usage"][-1:]
    assert last["price_source"] == prices.CATALOG


# -- the CLI --------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prices_show_a_catalog_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METERING_CONFIG", raising=False)
    Path("config.yaml").write_text("models: [not a config\n")  # --provider: the catalog's own entry, no config read
    code, out, _ = run_cli(capsys, "prices", "show", "gpt-5.4", "--provider", "openai")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f'gpt-5.4 (not configured: the catalog\'s prices, no markup): {prices.CATALOG}, '
                               'openai/gpt-5.4 ("GPT-5.4"), prices of ')  # fmt: skip
    assert "  context window (max_input_tokens): 1050000" in lines
    assert "    standard (auto, default or none asked): input 2.5, cached_input 0.25, output 15, " in out
    assert "    flex above 272000 input tokens: input 2.5, " in out
    assert "  not metered here: web_searches_kcount 10, storage_searches_kcount 2.5" in lines
    code, out, _ = run_cli(capsys, "prices", "show", "claude-sonnet-4-5", "--provider", "anthropic", "--json")
    sheet = json.loads(out)
    assert code == 0 and sheet["provider"] == "anthropic" and sheet["catalog"]["model"] == "claude-sonnet-4-5"
    assert sheet["price_source"] == prices.CATALOG and sheet["max_input_tokens"] == 200_000
    assert sheet["max_output_tokens"] is None and sheet["configured"] is False
    assert sheet["prices"]["default"]["long_context"][0] == {"above_input_tokens": 200_000, "input": "6",
        "cached_input": "0.6", "output": "22.5", "audio_input": "6", "audio_output": "22.5"}  # fmt: skip
    Path("config.yaml").unlink()  # no config: the catalog's own entries
    code, _, err = run_cli(capsys, "prices", "show", "gpt-4oo")
    assert code == 1 and "no model 'gpt-4oo' under provider 'openai' (closest: gpt-4o" in err


def test_prices_show_a_configured_model_as_it_is_charged(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    models = {"gpt-4o": {"upstream": "openai", "max_output_tokens": 4000, "markup_percent": 20,
                         "price": {"source": "catalog", "output": "11"}},
              "own": {"upstream": "openai", "price": {"input": "1", "output": "2"}}}  # fmt: skip
    path.write_text(yaml.safe_dump({"upstreams": UPSTREAMS, "models": models}))
    code, out, _ = run_cli(capsys, "--config", str(path), "prices", "show", "gpt-4o", "--json")
    sheet = json.loads(out)
    assert code == 0 and sheet["configured"] is True and sheet["markup_percent"] == "20"
    assert (sheet["max_input_tokens"], sheet["max_output_tokens"]) == (128_000, 4000)
    assert sheet["prices"]["default"] == {"input": "3", "cached_input": "1.5", "output": "13.2",
                                          "audio_input": "3", "audio_output": "13.2"}  # fmt: skip
    assert sheet["prices"]["priority"]["output"] == "20.4"  # the catalog's 17, marked up: the override is the base's
    code, out, _ = run_cli(capsys, "--config", str(path), "prices", "show", "own")
    assert code == 0 and out.startswith("own (configured): priced by the config\n")
    assert "    standard (auto, default or none asked): input 1, cached_input 1, output 2, " in out


def test_prices_list(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "prices", "list", "--provider", "openai")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"{prices.CATALOG}: provider openai, ")
    assert lines[1].split() == ["MODEL", "INPUT", "CACHED", "OUTPUT", "CONTEXT", "TIERS"]
    assert next(line for line in lines if line.startswith("gpt-4o ")).split() == [
        "gpt-4o", "2.5", "1.25", "10", "128000", "priority"]  # fmt: skip
    assert next(line for line in lines if line.startswith("tts-1 ")).endswith("not priced by tokens here")
    code, out, _ = run_cli(capsys, "prices", "list", "--provider", "anthropic", "--json")
    table = json.loads(out)
    assert code == 0 and table["catalog"] == prices.CATALOG and table["provider"] == "anthropic"
    row = next(m for m in table["models"] if m["model"] == "claude-sonnet-4-5")
    assert (row["input"], row["cached_input"], row["output"], row["long_context"]) == ("3", "0.3", "15", True)
    code, _, err = run_cli(capsys, "prices", "list", "--provider", "opneai")
    assert code == 1 and "unknown provider 'opneai'" in err and "closest: openai" in err
