"""deploy/ tried with the real software: Debian's `prometheus` scrapes a proxy process
(the scrape config of deploy/prometheus/prometheus.yml, pointed at it), evaluates the
alert rules, and answers every query of the Grafana dashboard with data; `promtool`
checks the rules, runs their unit tests and lints the proxy's /metrics.

Prometheus is not a Python package: `.ci/run` installs it (`apt-get install
prometheus`, which brings `promtool`); elsewhere install it the same way or set
METERING_TEST_PROMETHEUS to a `prometheus` binary with `promtool` beside it. Without it
this test fails, saying so: it never skips."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from redis.asyncio import Redis

from proxy.embedded import free_port
from proxy.testing.upstream import DemoUpstream

from .helpers import CHAT, ChildConfig, Receiver, child_config, funded_key, hook_config, spawn_proxy, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "metering-proxy.json"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
# what Grafana would put in place of its own variables, for a test that lasts under a minute
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1s"}
WAIT_S = 45


def binaries() -> tuple[str, str]:
    """(prometheus, promtool), or a failure that says how to get them."""
    given = os.environ.get("METERING_TEST_PROMETHEUS")
    prometheus = given or shutil.which("prometheus")
    promtool = str(Path(prometheus).with_name("promtool")) if prometheus else None
    if not prometheus or not promtool or not os.access(promtool, os.X_OK):
        pytest.fail(
            "this test needs the real Prometheus server and promtool: `sudo apt-get install prometheus` "
            "(Debian/Ubuntu; .ci/run does it), or set METERING_TEST_PROMETHEUS=/path/to/prometheus "
            "(with promtool in the same directory)",
            pytrace=False,
        )
    return prometheus, promtool


def promtool(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run([binaries()[1], *args], input=stdin, capture_output=True, text=True, cwd=PROMETHEUS_DIR)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# -- the dashboard's queries -------------------------------------------------------


@dataclass(frozen=True)
class Query:
    panel: str
    legend: str
    expr: str


def dashboard_queries() -> list[Query]:
    """Every target of every panel (rows included), the dashboard's variables replaced
    by the value Grafana gives them with "All" selected."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = dict(GRAFANA_VARIABLES)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            values[f"${var['name']}"] = var["allValue"]

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    found = []
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(values, key=len, reverse=True):  # $__range before $__r...
                expr = expr.replace(name, values[name])
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know: {expr}"
            found.append(Query(panel["title"], target.get("legendFormat", ""), expr))
    return found


def test_the_dashboard_reads_its_datasource_from_a_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    [source] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert source["query"] == "prometheus"
    uid = "${" + source["name"] + "}"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]
    titles = [p["title"] for p in dashboard["panels"] if p["type"] != "row"]
    assert len(titles) == len(set(titles)) and len(dashboard_queries()) >= 30


# panel title -> the alert whose threshold it draws, so a page at 3 a.m. shows where it fires
ALERT_LINES = {"5xx share": "MeteringProxyHigh5xxRate", "Worker lag": "MeteringProxyReservationsStuckOpen"}


def test_panels_draw_their_alerts_thresholds_and_each_series_its_unit() -> None:
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"][0]["rules"]
    alerts = {rule["alert"]: rule["expr"] for rule in rules}
    for title, alert in ALERT_LINES.items():
        fires_above = float(re.findall(r"> ([0-9.]+)", alerts[alert])[0])  # the rule's first comparison
        defaults = panels[title]["fieldConfig"]["defaults"]
        assert [step["value"] for step in defaults["thresholds"]["steps"]] == [None, fires_above], title
        assert defaults["custom"]["thresholdsStyle"]["mode"] != "off", title
    # one panel, two units: the pool's waits in seconds, its exhausted calls per second
    pool = panels["Redis connection pool"]
    assert pool["fieldConfig"]["defaults"]["unit"] == "s" and [t["refId"] for t in pool["targets"]] == ["A", "B"]
    [override] = pool["fieldConfig"]["overrides"]
    assert override["matcher"] == {"id": "byFrameRefID", "options": "B"}
    assert {"id": "unit", "value": "reqps"} in override["properties"]


# -- a real Prometheus ---------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    session: aiohttp.ClientSession

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params) as resp:
            body = await resp.json()
            assert body["status"] == "success", body
            return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    async def total(self, expr: str) -> float:
        return sum(float(r["value"][1]) for r in await self.query(expr))

    async def target_up(self) -> bool:
        return [t["health"] for t in (await self.api("targets"))["activeTargets"]] == ["up"]

    async def has_seen(self, requests: int, deliveries: int) -> bool:
        seen = await self.total('sum(metering_proxy_requests_total{job="metering-proxy"})')
        hooks = await self.total('sum(metering_proxy_webhook_deliveries_total{outcome="success"})')
        return seen >= requests and hooks >= deliveries

    async def rules(self) -> list[dict[str, Any]]:
        return [rule for group in (await self.api("rules"))["groups"] for rule in group["rules"]]

    async def rules_evaluated(self) -> bool:
        rules = await self.rules()
        return bool(rules) and all(r["lastEvaluation"] > "2000" for r in rules)  # Go's zero time before


def scrape_config(tmp_path: Path, admin_port: int) -> Path:
    """deploy/prometheus/prometheus.yml aimed at this test's proxy, every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{admin_port}"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def spawn_prometheus(tmp_path: Path, admin_port: int) -> tuple[subprocess.Popen[bytes], str]:
    """Prometheus on loopback, its TSDB in tmp_path; (process, its URL)."""
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:  # the child keeps its own copy
        process = subprocess.Popen(
            [binaries()[0], f"--config.file={scrape_config(tmp_path, admin_port)}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


async def start_prometheus(tmp_path: Path, admin_port: int) -> Prometheus:
    process, url = spawn_prometheus(tmp_path, admin_port)
    prometheus = Prometheus(url, process, aiohttp.ClientSession())
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while True:
        assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
        try:
            async with prometheus.session.get(f"{prometheus.url}/-/ready") as resp:
                if resp.status == 200:
                    return prometheus
        except aiohttp.ClientError:
            pass
        assert asyncio.get_running_loop().time() < deadline, "prometheus did not start"
        await asyncio.sleep(0.1)  # polling a child process's readiness


async def until(check: Any, what: str) -> None:
    """Poll an async check (Prometheus's view changes once a second) within WAIT_S."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what} within {WAIT_S}s"
        await asyncio.sleep(0.2)  # the next scrape or evaluation, bounded


REQUESTS_PER_ROUND = 5


async def traffic(cfg: ChildConfig, redis: Redis, round_: int) -> None:
    """A little of everything the dashboard shows: REQUESTS_PER_ROUND requests."""
    key = await funded_key(redis, cfg.config, f"acct-{round_}")  # credits.granted, delivered
    broke = await funded_key(redis, cfg.config, f"broke-{round_}", micro=1)
    client = openai.AsyncOpenAI(base_url=f"{cfg.url}/v1", api_key=key, max_retries=0)
    await client.chat.completions.create(**CHAT)
    async for _ in await client.chat.completions.create(**CHAT, stream=True):
        pass
    await client.embeddings.create(model="text-embedding-3-small", input="hello")
    for refused in (broke, "sk-unknown-1234567890"):  # 402, 401
        with pytest.raises(openai.APIStatusError):
            await openai.AsyncOpenAI(base_url=f"{cfg.url}/v1", api_key=refused, max_retries=0).chat.completions.create(
                **CHAT
            )


async def check_dashboard(prom: Prometheus) -> None:
    empty: list[Query] = []
    for query in dashboard_queries():
        result = await prom.query(query.expr)
        if not any(math.isfinite(float(r["value"][1])) for r in result):
            empty.append(query)
    assert not empty, "dashboard queries without data:\n" + "\n".join(
        f"  {q.panel} [{q.legend}]: {q.expr}" for q in empty
    )


async def check_rules(prom: Prometheus) -> None:
    await until(prom.rules_evaluated, "every alert rule evaluated")
    rules = await prom.rules()
    assert {r["name"] for r in rules} >= {
        "MeteringProxyRedisErrors", "MeteringProxyHigh5xxRate", "MeteringProxyReservationsStuckOpen",
        "MeteringProxyWebhookDeadLetters", "MeteringProxyConfigReloadFailed", "MeteringProxyReservationExceeded",
    }  # fmt: skip
    assert [(r["name"], r.get("lastError", "")) for r in rules if r["health"] != "ok"] == []
    firing = [a["labels"]["alertname"] for a in (await prom.api("alerts"))["alerts"]]
    assert firing == []  # a healthy proxy raises none


async def test_prometheus_scrapes_the_proxy_and_every_dashboard_query_has_data(
    tmp_path: Path, upstream: DemoUpstream, redis: Redis, redis_server: Any, receiver: Receiver
) -> None:
    binaries()
    cfg = child_config(tmp_path, upstream.base_url, redis_server.url, hook_config(receiver))
    proxy = spawn_proxy(cfg.path, tmp_path / "proxy.log")
    prometheus: Prometheus | None = None
    try:
        await wait_healthy(cfg.url, proxy)
        prometheus = prom = await start_prometheus(tmp_path, cfg.admin_port)
        await until(prom.target_up, "the proxy's /metrics scraped (no token needed)")
        # twice: a series born in a scrape shows no rate until a later one sees it grow
        for round_ in (1, 2):
            await traffic(cfg, redis, round_)
            seen = functools.partial(prom.has_seen, REQUESTS_PER_ROUND * round_, 2 * round_)  # two accounts funded
            await until(seen, f"round {round_} in Prometheus")
        await check_dashboard(prom)
        await check_rules(prom)

        async with aiohttp.ClientSession() as session:
            async with session.get(f"{cfg.admin_url}/metrics") as resp:
                exposition = await resp.text()
        promtool("check", "metrics", stdin=exposition)
        assert not re.search(r"^\w+_created[{ ]", exposition, re.M)  # the lint passes and no _created series
    finally:
        proxy.terminate()
        if prometheus is not None:
            prometheus.process.terminate()
            await prometheus.session.close()
            await asyncio.to_thread(prometheus.process.wait, 30)
        await asyncio.to_thread(proxy.wait, 30)


def test_promtool_checks_the_rules_and_their_unit_tests() -> None:
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
