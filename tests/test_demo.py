"""`make run` without an OpenAI key, as a newcomer runs it: `serve --demo` on the example
config (its embedded Valkey, the built-in fake OpenAI) prints a funded key, the curl
command and where the usage page and the console are; each of them answers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import yaml

from proxy.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
BANNER_S = 30  # the embedded Valkey and the demo upstream start first


async def banner(log: Path, process: subprocess.Popen[bytes]) -> str:
    deadline = asyncio.get_running_loop().time() + BANNER_S
    while "in another terminal" not in (text := await asyncio.to_thread(log.read_text)):
        assert process.poll() is None, f"serve --demo exited:\n{text}"
        assert asyncio.get_running_loop().time() < deadline, f"no demo banner:\n{text}"
        await asyncio.sleep(0.1)  # polling a child process's output
    return text


def spawn_demo(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`make run` without OPENAI_API_KEY: `metering-proxy serve --demo`, the example's admin token."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "METERING_ADMIN_TOKEN")}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(config), "serve", "--demo"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )


async def test_serve_demo_prints_a_working_key_and_the_pages(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    port, admin_port = free_port(), free_port()
    config["server"].update(port=port, admin_port=admin_port)
    config["data_dir"] = str(tmp_path / "data")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "demo.log"
    process = spawn_demo(path, log)
    try:
        text = await banner(log, process)
        [key] = re.findall(r"demo key \(shown once\): (sk-mp-\S+)", text)
        assert f"curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Authorization: Bearer {key}'" in text
        usage_url = f"http://127.0.0.1:{port}/usage"
        console_url = f"http://127.0.0.1:{admin_port}/"
        assert f"usage page (sign in with the demo key): {usage_url}\n" in text
        assert f"console (sign in with server.admin_token): {console_url}\n" in text

        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
        )
        await client.close()
        assert raw.parse().choices[0].message.content and float(raw.headers["x-metering-cost-usd"]) > 0
        async with aiohttp.ClientSession() as session:
            for url, title in ((usage_url, "Usage"), (console_url, "console")):
                async with session.get(url) as resp:
                    assert resp.status == 200 and title in await resp.text(), url
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
