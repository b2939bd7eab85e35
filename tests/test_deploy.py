"""docker-compose.yml and deploy/kubernetes, checked without Docker or a cluster (no image
can be pulled here): the compose file parsed and held to what the README promises
(Redis with AOF on a volume, Prometheus scraping the admin listener with deploy/'s
files, Grafana provisioned with the dashboard, every mounted file present), the
configs they mount validated, and the Kubernetes manifest validated against Kubernetes'
own schemas (`kubernetes-validate`, strict) and against the config it runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Config
from proxy.configfile import load_config

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "0123456789abcdef-not-a-default"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def service_config(service: dict[str, Any]) -> Config:
    """The config file a service mounts at METERING_CONFIG, with its environment."""
    target = service["environment"]["METERING_CONFIG"]
    [source] = [m.split(":")[0] for m in service["volumes"] if m.split(":")[1] == target]
    return load_config(ROOT / source, env={"METERING_ADMIN_TOKEN": TOKEN})


def host_paths(service: dict[str, Any]) -> list[Path]:
    return [ROOT / m.split(":")[0] for m in service.get("volumes", []) if m.startswith("./")]


def test_compose_runs_the_proxy_on_redis_with_aof_on_a_volume() -> None:
    spec = compose()
    proxy, redis = spec["services"]["proxy"], spec["services"]["redis"]
    assert proxy["build"] == "." and (ROOT / "Dockerfile").exists()
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy" and "healthcheck" in redis
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "always"  # a billing store: docs/reliability.md
    volume = next(v for v in redis["volumes"] if v.endswith(":/data"))
    assert volume.split(":")[0] in spec["volumes"]  # a named volume, not the container's layer

    config = service_config(proxy)
    assert config.redis is not None and config.redis.url.get_secret_value() == "redis://redis:6379/0"
    data = next(v for v in proxy["volumes"] if v.endswith(f":{config.data_dir}"))
    assert data.split(":")[0] in spec["volumes"]  # the settlement journal survives a re-create
    # ${VAR:?message}: compose refuses to start without a token rather than run without one
    assert proxy["environment"]["METERING_ADMIN_TOKEN"].startswith("${METERING_ADMIN_TOKEN:?")
    assert config.server.admin_host == "0.0.0.0"  # Prometheus scrapes it across the compose network
    published = {p.rsplit(":", 1)[-1]: p for p in proxy["ports"]}
    assert published[str(config.server.port)] == f"{config.server.port}:{config.server.port}"
    assert published[str(config.server.admin_port)].startswith("127.0.0.1:")  # the admin API stays local
    grace = int(proxy["stop_grace_period"].removesuffix("s"))
    assert grace >= config.server.shutdown_timeout_s + 5  # the drain ends before compose's SIGKILL


def test_compose_prometheus_scrapes_the_admin_listener_with_the_deploy_files() -> None:
    spec = compose()
    prometheus, proxy = spec["services"]["prometheus"], spec["services"]["proxy"]
    mounts = dict(m.split(":")[:2] for m in prometheus["volumes"])
    assert mounts["./deploy/prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and "authorization" not in job  # /metrics needs no token
    port = service_config(proxy).server.admin_port
    assert job["static_configs"] == [{"targets": [f"proxy:{port}"]}]
    assert all((ROOT / "deploy/prometheus" / name).exists() for name in scrape["rule_files"])


def test_compose_grafana_is_provisioned_with_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(m.split(":")[:2] for m in grafana["volumes"])
    provisioning = ROOT / next(src for src, dst in mounts.items() if dst == "/etc/grafana/provisioning")
    [source] = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    [provider] = yaml.safe_load((provisioning / "dashboards/metering-proxy.yml").read_text())["providers"]
    dashboards = {dst: ROOT / src for src, dst in mounts.items() if dst.startswith(provider["options"]["path"] + "/")}
    assert [json.loads(p.read_text())["uid"] for p in dashboards.values()] == ["metering-proxy"]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in dashboards
    # no internet at run time: no plugin installs, no update checks
    assert "GF_INSTALL_PLUGINS" not in grafana["environment"]
    assert grafana["environment"]["GF_ANALYTICS_CHECK_FOR_UPDATES"] == "false"


def test_every_file_compose_mounts_exists_and_images_are_pinned() -> None:
    for name, service in compose()["services"].items():
        for path in host_paths(service):
            assert path.exists(), f"{name} mounts {path}, which is missing"
        if "build" not in service:
            assert re.fullmatch(r"[\w./-]+:v?\d[\w.-]*", service["image"]), f"{name}: pin the image's version"


# -- Kubernetes ---------------------------------------------------------------------


def manifests() -> dict[str, Any]:
    docs = yaml.safe_load_all((ROOT / "deploy/kubernetes/metering-proxy.yaml").read_text())
    return {doc["kind"]: doc for doc in docs}


def test_kubernetes_manifest_is_valid_for_kubernetes() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("kubernetes-validate")), "--strict", "--quiet",
         str(ROOT / "deploy/kubernetes/metering-proxy.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_probes_and_grace_fit_the_proxy() -> None:
    pod = manifests()["StatefulSet"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    config = load_config(ROOT / "deploy/compose/config.yaml", env={"METERING_ADMIN_TOKEN": TOKEN})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"client": config.server.port, "admin": config.server.admin_port}
    ready, alive = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], ports[ready["port"]]) == ("/readyz", config.server.admin_port)  # Redis, draining
    assert alive["path"] == "/healthz"  # never Redis: an outage must not restart every pod
    [_, pause] = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pod["terminationGracePeriodSeconds"] >= int(pause) + config.server.shutdown_timeout_s + 5
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(config.data_dir) in mounts  # the journal on the pod's own volume
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["METERING_ADMIN_TOKEN"]["valueFrom"]


@pytest.mark.parametrize("path", ["deploy/compose/config.yaml", "config.example.yaml"])
def test_shipped_configs_validate(path: str) -> None:
    assert load_config(ROOT / path, env={"METERING_ADMIN_TOKEN": TOKEN}).models
