"""A lean fake OpenAI upstream for the benchmark: canned chat completions, JSON or a
stream of TOKENS content chunks (+ the usage chunk when asked, then [DONE]), each chunk
written on its own (`metadata.bench_chunks` and `bench_delay_ms` ask for a longer, slower
stream). Unlike proxy/testing/upstream.py it records nothing and has no
fault knobs, so the same cheap floor serves every target.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from aiohttp import web

TOKENS = 16
PROMPT = 14


def make_app() -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        n = min(TOKENS, int(body.get("max_tokens") or body.get("max_completion_tokens") or TOKENS))
        meta = body.get("metadata") or {}  # bench/memory.py's long stream: more chunks, written slowly
        n, delay_s = int(meta.get("bench_chunks") or n), int(meta.get("bench_delay_ms") or 0) / 1000
        usage = {"prompt_tokens": PROMPT, "completion_tokens": n, "total_tokens": PROMPT + n}
        base = {"id": "chatcmpl-bench", "created": int(time.time()), "model": body.get("model", "gpt-4o-mini")}
        if not body.get("stream"):
            text = " ".join(f"tok{i}" for i in range(n))
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            answer = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        chunk = {**base, "object": "chat.completion.chunk"}
        for i in range(n):
            delta = {"content": f"tok{i} "} if i else {"role": "assistant", "content": "tok0 "}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": "stop" if i == n - 1 else None}
            event = {**chunk, "choices": [choice], **({"usage": None} if with_usage else {})}
            await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
            if delay_s:
                await asyncio.sleep(delay_s)
        if with_usage:
            await resp.write(b"data: " + orjson.dumps({**chunk, "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

    app = web.Application(client_max_size=64 * 1024 * 1024)  # bench/memory.py's 10 MB prompts
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)
