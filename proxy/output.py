"""How the CLI prints: tables for people, JSON for scripts (`--json`), progress on a
terminal.

`emit(data)` takes the JSON shapes the admin API answers with (views.py) and prints
them as JSON under `--json`, else readable: a mapping as aligned `key  value` lines
(nested mappings flattened with dots), each list of mappings in it as a table below,
titled by its key. Money stays a decimal string either way. `Progress` draws one line on
stderr, only when stderr is a terminal, so pipes and files never see it.
"""

from __future__ import annotations

import contextvars
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

import orjson

JSON: contextvars.ContextVar[bool] = contextvars.ContextVar("cli_json_output", default=False)
MAX_CELL = 48  # a table cell longer than this is cut (`--json` shows it whole)
NONE = "-"
SLICE = 4096


def emit(data: Any, columns: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Print a result; `columns` picks (and orders) a top-level table's columns."""
    text = orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n" if JSON.get() else render(data, columns)
    write(text, out or sys.stdout)
    return 0


def write(text: str, out: TextIO) -> None:
    """Write and flush, in slices: a reader that goes away (`| head`) then always raises
    BrokenPipeError (cli.main's exit 141). One large write that the pipe takes in part
    before failing is reported as done by Python's buffered writer, the rest dropped."""
    for start in range(0, len(text), SLICE):
        out.write(text[start : start + SLICE])
    out.flush()


def render(data: Any, columns: Sequence[str] | None = None) -> str:
    if isinstance(data, Mapping):
        return _mapping(data, columns)
    if _rows(data):
        return table(data, columns)
    if isinstance(data, list):
        return "".join(f"{cell(item, wide=True)}\n" for item in data)
    return f"{cell(data, wide=True)}\n"


def _rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, Mapping) for item in value)


def _mapping(data: Mapping[str, Any], columns: Sequence[str] | None) -> str:
    pairs = [(k, v) for k, v in _flat(data) if not _rows(v) and not (k == "object" and v == "list")]
    tables = [(k, v) for k, v in data.items() if _rows(v)]
    lists = [k for k, v in data.items() if v == []]  # an empty list of rows: say so
    width = max((len(k) for k, _ in pairs), default=0)
    text = "".join(f"{k.ljust(width)}  {cell(v, wide=True)}\n" for k, v in pairs if k not in lists)
    for name in lists:
        text += f"{name.ljust(width)}  (none)\n"
    for name, rows in tables:
        title = "" if len(tables) == 1 and not pairs else f"\n{name}:\n"
        text += title + table(rows, columns if len(tables) == 1 else None)
    return text


def _flat(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Aligned columns with a header; every key any row has, in first-seen order. A chosen
    column may name a nested field with dots (`usage_usd.total`)."""
    names = list(columns) if columns else list(dict.fromkeys(k for row in rows for k in row))
    grid = [[name.upper() for name in names]] + [[cell(_field(row, name)) for name in names] for row in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(names))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n" for line in grid)


def _field(row: Mapping[str, Any], name: str) -> Any:
    value: Any = row
    for part in name.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def cell(value: Any, wide: bool = False) -> str:
    if value is None:
        text = NONE
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, Mapping):
        text = " ".join(f"{k}={cell(v, wide=True)}" for k, v in value.items()) or NONE
    elif isinstance(value, list):
        text = ", ".join(cell(v, wide=True) for v in value) or NONE
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if wide or len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def error(message: str, body: bytes | None = None) -> None:
    """An error on stderr: the OpenAI-shaped body under `--json`, else one line."""
    if JSON.get() and body is not None:
        sys.stderr.write(body.decode() + "\n")
    else:
        sys.stderr.write(f"error: {message}\n")


class Progress:
    """`label [#####.....] 12/40` on stderr, redrawn at most 10 times a second, only on a
    terminal; `done()` clears it."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.label, self.total, self.count = label, total, 0
        self.shown = total > 0 and _is_tty(self.stream)
        self._drawn = 0.0

    def advance(self, n: int = 1) -> None:
        self.count = min(self.total, self.count + n)
        if self.shown and (time.monotonic() - self._drawn >= 0.1 or self.count == self.total):
            self._drawn = time.monotonic()
            filled = 30 * self.count // self.total
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self.count}/{self.total}")
            self.stream.flush()

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def progress(label: str, total: int) -> Iterator[Progress]:
    bar = Progress(label, total)
    try:
        yield bar
    finally:
        bar.done()
