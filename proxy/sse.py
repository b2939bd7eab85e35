"""Incremental Server-Sent Events parsing for the relay (WHATWG rules).

The relay feeds network chunks as they arrive and gets back whole events, each with
the bytes to forward, so nothing waits for more than one event and the body is never
held whole. Line ends (CRLF, LF, CR) are normalised to LF in forwarded bytes; the
events mean the same to any SSE client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")
_EVENT_END = b"\n\n"


@dataclass(slots=True)
class Event:
    event: str | None  # the `event:` field, if any
    data: bytes  # `data:` lines joined with LF
    raw: bytes  # the normalised event block to forward, with its blank line


class SSEParser:
    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[Event]:
        buf = self._buf + chunk
        if b"\r" in buf:
            # a CR at the very end may be the first half of a CRLF split across chunks
            keep_cr = buf.endswith(b"\r")
            buf = _LINE_END.sub(b"\n", buf[:-1] if keep_cr else buf) + (b"\r" if keep_cr else b"")
        events = []
        start = 0
        while (end := buf.find(_EVENT_END, start)) != -1:
            if buf.startswith(b"data: ", start) and buf.find(b"\n", start, end) == -1:  # most: one data line
                events.append(Event(None, buf[start + 6 : end], buf[start : end + 2]))
            else:
                events.append(_parse_block(buf[start:end]))
            start = end + 2
        self._buf = buf[start:]
        return events

    def finish(self) -> tuple[list[Event], bytes]:
        """At end of stream: events completed by a held CR, and the bytes of an
        unterminated last event (which clients discard, per the spec)."""
        events = self.feed(b"\n") if self._buf.endswith(b"\r") else []
        rest, self._buf = self._buf, b""
        return events, rest


def _parse_block(block: bytes) -> Event:
    event: str | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    return Event(event, b"\n".join(data), block + _EVENT_END)


def data_event(payload: bytes, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + payload + _EVENT_END
