"""`metering-proxy config check|diff|schema` through the CLI's main(): warnings on legal
but suspicious files, what a reload would change, and a JSON Schema that real files
validate against (jsonschema, as an editor's YAML plugin would use it)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from proxy.cli import main

ROOT = Path(__file__).resolve().parent.parent
BASE = """\
upstreams:
  openai: {base_url: "https://api.openai.com/v1", api_key: "${OPENAI_TEST_KEY}"}
models:
  gpt-4o: {upstream: openai, price: {input: "2.50", cached_input: "1.25", output: "10.00"}}
  text-embedding-3-small: {upstream: openai, price: {input: "0.02"}}
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_check_warns_about_suspicious_prices_and_empty_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_TEST_KEY", raising=False)
    text = BASE + (
        '  free-chat: {upstream: openai, price: {input: "1"}}\n'  # line 6
        '  swapped: {upstream: openai, price: {input: "10", output: "2"}}\n'
        '  odd-cache: {upstream: openai, price: {input: "1", cached_input: "2", output: "4"}}\n'
    )
    code, out, err = run(capsys, "config", "check", write(tmp_path, text))
    assert code == 0 and out.startswith("ok: 5 models")  # warnings never fail a check
    assert err.splitlines() == [
        "warning: the admin listener is disabled: server.admin_token is empty (is its ${VAR} set?): "
        "no admin API, /metrics or /readyz",
        "warning: upstreams.openai.api_key: ${OPENAI_TEST_KEY} expands to nothing: no key is sent upstream (line 2)",
        "warning: models.free-chat.price: output is 0 on what looks like a chat model: "
        "its completions would be free (line 6)",
        "warning: models.swapped.price: input (10) is dearer than output (2): swapped? (line 7)",
        "warning: models.odd-cache.price: cached_input (2) is dearer than input (1) (line 8)",
    ]  # and none for the embedding model's free output

    monkeypatch.setenv("OPENAI_TEST_KEY", "sk-set")
    code, out, err = run(capsys, "config", "check", write(tmp_path, BASE + "server: {admin_token: t0ken}\n"), "--json")
    report = json.loads(out)
    assert code == 0 and err == "" and report["ok"] is True and report["warnings"] == []
    assert report["models"] == 2 and set(report["prices"]) == {"gpt-4o", "text-embedding-3-small"}
    sheet = report["prices"]["gpt-4o"]  # each model's sheet as `prices show --json` prints it: for scripts
    assert sheet["price_source"] == "config" and sheet["prices"]["default"]["input"] == "2.5"
    assert sheet["prices"]["default"]["output"] == "10"


def test_check_json_lists_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "config", "check", write(tmp_path, BASE + "bogus: 1\n"), "--json")
    assert code == 1 and json.loads(out) == {"ok": False, "errors": ["bogus: unknown key (line 6)"], "warnings": []}


def test_the_shipped_configs_check_without_price_warnings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERING_ADMIN_TOKEN", "0123456789abcdef-a-real-one")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    for path in ("config.example.yaml", "deploy/compose/config.yaml"):
        code, _, err = run(capsys, "config", "check", str(ROOT / path))
        assert code == 0 and err == "", (path, err)


def test_diff_says_what_a_reload_would_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write(tmp_path, BASE + "server: {port: 8080}\nwebhooks: {url: 'https://b.example/h', secret: whsec_AAAA}\n")
    new_text = (
        BASE.replace('input: "2.50"', "input: 3")  # a price, written another way
        .replace('cached_input: "1.25"', "cached_input: 1.25")  # the same price, written another way
        .replace('  text-embedding-3-small: {upstream: openai, price: {input: "0.02"}}\n', "")
        + '  o3-mini: {upstream: openai, price: {input: "1.10", output: "4.40"}}\n'
        + "server: {port: 9090}\nwebhooks: {url: 'https://b.example/h?token=tok_CCCC', secret: whsec_BBBB}\n"
    )
    new = write(tmp_path, new_text, "new.yaml")
    code, out, _ = run(capsys, "config", "diff", old, new)
    lines = out.splitlines()
    assert code == 0
    assert "~ models.gpt-4o.price.input: 2.50 -> 3" in lines
    assert not any("gpt-4o.price.cached_input" in line for line in lines)  # 1.25 == "1.25"
    assert any(line.startswith("- models.text-embedding-3-small: ") for line in lines)
    assert any(line.startswith('+ models.o3-mini: {"upstream":"openai"') for line in lines)
    assert "~ server.port: 8080 -> 9090  (needs a restart: a reload keeps the old value)" in lines
    assert "~ webhooks.secret: (secret) -> (secret)" in lines and "AAAA" not in out and "BBBB" not in out
    assert "~ webhooks.url: (secret) -> (secret)" in lines and "CCCC" not in out  # a URL may carry a token

    code, out, _ = run(capsys, "config", "diff", old, new, "--json")
    report = json.loads(out)
    assert code == 0 and report["restart_needed"] is True
    assert {"path": "models.gpt-4o.price.input", "old": "2.50", "new": "3", "restart": False} in report["changes"]

    assert run(capsys, "config", "diff", old, old)[1] == "no changes\n"
    code, out, err = run(capsys, "config", "diff", old, write(tmp_path, "models: [", "bad.yaml"))
    assert code == 1 and out == "" and "bad.yaml: invalid config" in err


def test_schema_validates_real_files_and_refuses_typos(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "config", "schema")
    schema = json.loads(out)
    assert code == 0 and schema["$schema"].endswith("2020-12/schema")
    validator = jsonschema.Draft202012Validator(schema)
    for path in ("config.example.yaml", "deploy/compose/config.yaml"):
        document = yaml.safe_load((ROOT / path).read_text())  # as written, ${VAR}s and all
        assert not list(validator.iter_errors(document)), path
    typo = yaml.safe_load(BASE.replace("upstream: openai, price", "upstrem: openai, price", 1))
    assert any("upstrem" in e.message for e in validator.iter_errors(typo))
