"""Tests for proxy.config (schema) and proxy.configfile (env expansion, line-numbered errors,
configtools.check); most drive the schema through parse_config to check the errors users see."""

from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from proxy.config import Config
from proxy.configfile import ConfigError, load_config, parse_config
from proxy.configtools import check

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"

MINIMAL = """\
upstreams:
  openai: {base_url: "https://api.openai.com/v1", api_key: "${OPENAI_API_KEY}"}
models:
  gpt-4o:
    upstream: openai
    price: {input: 2.5, cached_input: "1.25", output: "10.00"}
"""


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env=env or {})
    return info.value.errors


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE, env={})
    assert set(config.models) == {
        "gpt-4o",
        "gpt-4o-mini",
        "o3-mini",
        "text-embedding-3-small",
    }
    assert config.redis is None
    assert config.server.port == 8080 and config.server.admin_port == 8081
    assert config.server.admin_token is not None
    assert config.server.admin_token.get_secret_value() == "dev-admin-token"
    assert config.upstreams["openai"].base_url == "https://api.openai.com/v1"
    assert config.upstreams["openai"].api_key is None  # "${OPENAI_API_KEY:-}" unset
    assert [t.name for t in config.rate_tiers.tiers] == ["free", "tier-1", "tier-2"]
    assert config.rate_tiers.tiers[0].rpm == 60
    assert config.plans["plus"].on_exhausted is not None
    assert config.plans["plus"].on_exhausted.downgrade_to == "gpt-4o-mini"
    pro = config.plans["pro"].overage
    assert pro is not None and pro.limit_usd is None
    assert pro.invoice_every_usd == Decimal(50)
    assert config.default_plan is None and config.webhooks is None


def test_embedding_and_cached_price_defaults() -> None:
    from proxy.catalog import price_of

    config = load_config(EXAMPLE, env={})
    embed = config.models["text-embedding-3-small"].price
    assert embed.output is None and embed.cached_input is None
    priced = price_of(embed, Decimal(0))
    assert priced.output == Decimal(0) and priced.cached_input == priced.input == Decimal("0.02")
    mini = config.models["gpt-4o-mini"].price
    assert price_of(mini, Decimal(0)).cached_input == Decimal("0.075")


def test_defaults_when_sections_absent() -> None:
    config = parse_config(MINIMAL, env={})
    assert config.billing.default_max_output_tokens == 4096
    assert config.billing.on_insufficient == "reject"
    (tier,) = config.rate_tiers.tiers
    assert (tier.name, tier.min_usd, tier.rpm, tier.tpm) == (
        "default",
        Decimal(0),
        10000,
        100000000,
    )
    assert config.plans == {} and config.metrics.per_account_labels is False
    assert config.data_dir == Path(".metering-proxy")
    assert config.markup_for("gpt-4o") == Decimal(0)
    assert config.upstream_model("gpt-4o") == "gpt-4o"


def test_env_expansion_with_and_without_defaults() -> None:
    text = MINIMAL + ('server:\n  port: "${PORT:-9000}"\n  admin_token: "${ADMIN}"\n  host: "${HOST:-127.0.0.1}"\n')
    config = parse_config(text, env={"OPENAI_API_KEY": "sk-live", "HOST": "::"})
    key = config.upstreams["openai"].api_key
    assert key is not None and key.get_secret_value() == "sk-live"
    assert config.server.port == 9000  # default used, then coerced to int
    assert config.server.host == "::"  # set variable wins over the default
    assert config.server.admin_token is None  # unset, no default -> "" -> disabled

    config = parse_config(text, env={"PORT": "7000", "ADMIN": "tok"})
    assert config.server.port == 7000
    assert config.upstreams["openai"].api_key is None
    assert config.server.admin_token is not None
    assert config.server.admin_token.get_secret_value() == "tok"


def test_an_upstream_key_with_a_line_break_is_refused_without_showing_it() -> None:
    """The key goes into the upstream request's head: a newline (an env file's) would end
    the Authorization line early. The error names the field, never the key."""
    text = MINIMAL + 'server:\n  admin_token: "${ADMIN:-}"\n'
    for key in ("sk-live-secret\n", "sk-live\r\nx-injected: 1", "sk-live\0"):
        (error,) = errors_of(text, env={"OPENAI_API_KEY": key})
        assert error.startswith("upstreams.openai.api_key: must not contain a line break") and "sk-live" not in error
    assert parse_config(text, env={"OPENAI_API_KEY": "sk-live"}).upstreams["openai"].api_key is not None


def test_env_expansion_of_required_field_to_empty_is_an_error() -> None:
    text = MINIMAL.replace("upstream: openai", 'upstream: "${UP}"')
    (error,) = errors_of(text)
    assert error == ("models.gpt-4o.upstream: must not be empty (is its environment variable set?) (line 5)")


def test_env_expansion_escape_and_malformed() -> None:
    text = MINIMAL + 'default_plan: "$${NOT_A_VAR}"\nplans: {"${NOT_A_VAR}": {}}\n'
    config = parse_config(text, env={"NOT_A_VAR": "x"})
    assert config.default_plan == "${NOT_A_VAR}"  # keys are never expanded

    errors = errors_of(MINIMAL.replace("gpt-4o:", "gpt-4o:\n    encoding: '${BAD'"))
    assert errors == [("models.gpt-4o.encoding: malformed variable reference; use ${VAR} or ${VAR:-default} (line 5)")]


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    key = parse_config(MINIMAL).upstreams["openai"].api_key
    assert key is not None and key.get_secret_value() == "sk-from-env"


def test_unknown_key_rejected_with_line_number() -> None:
    text = MINIMAL + "billing:\n  markup_percent: 10\n  markup_pct: 10\n"
    assert errors_of(text) == ["billing.markup_pct: unknown key (line 9)"]


def test_multiple_errors_all_reported_in_file_order() -> None:
    text = """\
server: {port: eighty}
upstreams:
  openai: {base_url: "ftp://example.com"}
models:
  gpt-4o:
    upstream: openai
    price: {input: "2.50", output: "-1"}
    colour: blue
"""
    assert errors_of(text) == [
        ("server.port: Input should be a valid integer, unable to parse string as an integer (line 1)"),
        "upstreams.openai.base_url: must be an http:// or https:// URL (line 3)",
        "models.gpt-4o.price.output: must not be negative (line 7)",
        "models.gpt-4o.colour: unknown key (line 8)",
    ]


def test_error_string_lists_every_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("server: {port: x, bogus: 1}\n", env={})
    message = str(info.value)
    assert len(info.value.errors) == 4  # port, bogus, upstreams, models
    assert all(e in message for e in info.value.errors)
    assert message.count("\n") == 3


@pytest.mark.parametrize(
    ("price", "message"),
    [
        ('"abc"', "Input should be a valid decimal"),
        ("-1", "must not be negative"),
        (".nan", "Input should be a finite number"),
        ('"Infinity"', "Input should be a finite number"),
        ('"0.0000001"', "must have at most 6 decimal places (micro-USD)"),
        ("true", "must be a number, not a boolean"),
    ],
)
def test_bad_price(price: str, message: str) -> None:
    text = MINIMAL.replace("input: 2.5", f"input: {price}")
    assert errors_of(text) == [f"models.gpt-4o.price.input: {message} (line 6)"]


def test_missing_price_points_at_parent_line() -> None:
    text = MINIMAL.replace('    price: {input: 2.5, cached_input: "1.25", output: "10.00"}\n', "")
    assert errors_of(text) == ["models.gpt-4o.price: Field required (line 4)"]


def test_missing_upstream_reference() -> None:
    text = MINIMAL.replace("upstream: openai", "upstream: azure")
    assert errors_of(text) == ["models.gpt-4o.upstream: unknown upstream 'azure' (configured: openai) (line 5)"]


def test_downgrade_and_default_plan_references() -> None:
    text = MINIMAL + (
        "plans:\n"
        "  plus:\n"
        "    allocation: {amount_usd: '20', every: month}\n"
        "    on_exhausted: {downgrade_to: gpt-4o-mini}\n"
        "default_plan: gold\n"
    )
    assert errors_of(text) == [
        ("plans.plus.on_exhausted.downgrade_to: unknown model 'gpt-4o-mini' (configured: gpt-4o) (line 10)"),
        "default_plan: unknown plan 'gold' (configured: plus) (line 11)",
    ]
    fixed = text.replace("gpt-4o-mini", "gpt-4o").replace("gold", "plus")
    assert parse_config(fixed, env={}).default_plan == "plus"


def test_reference_errors_reported_with_field_errors() -> None:
    text = MINIMAL.replace("upstream: openai", "upstream: azure").replace('output: "10.00"', "output: x")
    assert errors_of(text) == [
        "models.gpt-4o.upstream: unknown upstream 'azure' (configured: openai) (line 5)",
        "models.gpt-4o.price.output: Input should be a valid decimal (line 6)",
    ]


def test_tier_rules() -> None:
    text = (
        MINIMAL
        + """\
rate_tiers:
  tiers:
    - {name: a, min_usd: "1", rpm: 1, tpm: 1}
    - {name: a, min_usd: "0.5", rpm: 1, tpm: 1, models: {nope: {rpm: 1, tpm: 1}}}
"""
    )
    assert errors_of(text) == [
        "rate_tiers.tiers[0].min_usd: the first tier must have min_usd 0 (line 9)",
        "rate_tiers.tiers[1].name: duplicate tier name 'a' (line 10)",
        ("rate_tiers.tiers[1].min_usd: tiers must be sorted by ascending min_usd (line 10)"),
        ("rate_tiers.tiers[1].models.nope: unknown model 'nope' (configured: gpt-4o) (line 10)"),
    ]


def test_prices_as_numbers_become_exact_decimals() -> None:
    price = parse_config(MINIMAL, env={}).models["gpt-4o"].price
    assert price.input == Decimal("2.5") and isinstance(price.input, Decimal)
    assert str(price.input) == "2.5"  # not 2.5000000000000000001 from a binary float
    assert price.cached_input == Decimal("1.25")
    text = MINIMAL.replace("input: 2.5", "input: 0.075")
    assert str(parse_config(text, env={}).models["gpt-4o"].price.input) == "0.075"


def test_webhook_secret_must_be_whsec_base64() -> None:
    base = MINIMAL + "webhooks: {url: 'https://hooks.example.com', secret: '%s'}\n"
    good = parse_config(base % "whsec_c2VjcmV0", env={})
    assert good.webhooks is not None and good.webhooks.signing_keys() == (b"secret",)
    for bad in ("c2VjcmV0", "whsec_not base64!"):
        (error,) = errors_of(base % bad)
        assert error.startswith("webhooks.secret: must ")
        assert bad not in error  # the secret is never echoed


def test_previous_webhook_secrets_sign_too_and_are_checked() -> None:
    base = MINIMAL + "webhooks: {url: 'https://hooks.example.com', secret: whsec_bmV3, previous_secrets: [%s]}\n"
    rotating = parse_config(base % "whsec_b2xk", env={})
    assert rotating.webhooks is not None and rotating.webhooks.signing_keys() == (b"new", b"old")
    assert {"whsec_bmV3", "whsec_b2xk"} <= set(rotating.secrets())  # both redacted from logs
    (error,) = errors_of(base % "old")
    assert error.startswith("webhooks.previous_secrets[0]: must start with 'whsec_'")


def test_secrets_listed_and_not_in_repr() -> None:
    text = MINIMAL + (
        "server: {admin_token: adm-123}\n"
        "redis: {url: 'redis://user:hunter2@redis:6379/0'}\n"
        "webhooks: {url: 'https://h.example.com', secret: whsec_c2VjcmV0}\n"
    )
    config = parse_config(text, env={"OPENAI_API_KEY": "sk-live-456"})
    secrets = config.secrets()
    assert set(secrets) == {"adm-123", "sk-live-456", "hunter2", "whsec_c2VjcmV0"}
    dumped = repr(config) + str(config)
    assert not any(s in dumped for s in secrets)


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL, env={})
    with pytest.raises(ValidationError):
        config.server.port = 1


def test_direct_construction_checks_references() -> None:
    data = {
        "upstreams": {"o": {"base_url": "http://x"}},
        "models": {"m": {"upstream": "z", "price": {"input": 1}}},
    }
    with pytest.raises(ValidationError, match="unknown upstream 'z'"):
        Config.model_validate(data)


def test_yaml_syntax_error_has_line() -> None:
    (error,) = errors_of(MINIMAL + "billing: {markup_percent: 1\n")
    assert error.startswith("invalid YAML:") and error.endswith("(line 8)")


def test_duplicate_key_reported() -> None:
    text = MINIMAL + "billing: {}\nbilling: {}\n"
    assert errors_of(text) == ["billing: duplicate key (line 8)"]


def test_check_ok_for_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert check(EXAMPLE) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "ok: 4 models, 1 upstream, 3 plans"
    assert "    priority: input 4.25, cached_input 2.125, output 17, audio_input 2.5, audio_output 10" in out


def test_check_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL.replace("upstream: openai", "upstream: nope") + "x: 1\n")
    assert check(path) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "models.gpt-4o.upstream: unknown upstream 'nope' (configured: openai) (line 5)",
        "x: unknown key (line 7)",
    ]


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(tmp_path / "absent.yaml") == 1
    assert "cannot read config" in capsys.readouterr().err


def test_an_empty_admin_token_is_a_visible_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(MINIMAL + "server: {admin_token: '${UNSET_ADMIN_TOKEN}'}\n")
    assert check(path) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: ") and "warning: the admin listener is disabled: server.admin_token is empty" in err


def test_admin_beyond_loopback_needs_a_real_token() -> None:
    base = MINIMAL + "server: {admin_host: '%s', admin_token: '%s'}\n"
    for host, token in (("0.0.0.0", ""), ("0.0.0.0", "dev-admin-token"), ("10.0.0.5", "short"), ("proxy.lan", "")):
        (error,) = errors_of(base % (host, token))
        assert error.startswith(f"server: admin_host {host} is reachable beyond loopback"), error
        assert not token or token not in error.replace("dev-admin-token", "")  # a token is never echoed
    for host, token in (("127.0.0.1", "dev-admin-token"), ("::1", ""), ("localhost", "x"), ("0.0.0.0", "y" * 16)):
        assert parse_config(base % (host, token), env={}).server.admin_host == host
