"""Reading a YAML config file into a `Config` (whose schema lives in `config`).

`parse_config`/`load_config` compose the YAML into nodes (to keep line numbers), expand
`${VAR}` / `${VAR:-default}` in string scalars (an unset variable expands to ""),
validate, and raise one `ConfigError` listing every problem as `path: message (line N)`.
`read_config` also returns each path's line and every expansion (for `config check`).
"""

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from . import prices
from .catalog import price_of
from .config import DEFER_REFERENCE_CHECKS, Config
from .configrefs import Loc, format_loc, reference_errors


class ConfigError(Exception):
    """A config that cannot be used; `errors` holds one line per problem."""

    def __init__(self, errors: list[str], source: str = "<string>") -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)
        self.source = source

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --- YAML: nodes, line numbers, ${VAR} expansion -----------------------------------

_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}|\$\{")
_STR_TAG = "tag:yaml.org,2002:str"


def _expand(value: str, env: Mapping[str, str], on_error: Callable[[str], None]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$${":  # escaped: a literal "${"
            return "${"
        if m.group(1) is None:
            on_error("malformed variable reference; use ${VAR} or ${VAR:-default}")
            return m.group(0)
        value = env.get(m.group(1), "")
        if m.group(2) and not value:  # like the shell, ":-" also covers set-but-empty
            return m.group(3)
        return value

    return _VAR.sub(sub, value)


@dataclass(frozen=True)
class Expansion:
    """A string scalar that named variables: as written, and what it became."""

    line: int
    written: str
    value: str


class _Walker:
    """Expands env vars in string scalars and records the line of every path."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.lines: dict[Loc, int] = {}
        self.expansions: dict[Loc, Expansion] = {}
        self.problems: list[tuple[int, str]] = []
        self._done: set[int] = set()  # aliased nodes are expanded once

    def walk(self, node: yaml.Node, path: Loc) -> None:
        if id(node) in self._done:
            return
        self._done.add(id(node))
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR_TAG:
            line = node.start_mark.line + 1

            def report(msg: str) -> None:
                self.problems.append((line, _fmt(path, msg)))

            written, node.value = node.value, _expand(node.value, self.env, report)
            if "${" in written:
                self.expansions[path] = Expansion(line, written, node.value)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                self.walk(item, path + (i,))
        elif isinstance(node, yaml.MappingNode):
            self._walk_mapping(node, path)

    def _walk_mapping(self, node: yaml.MappingNode, path: Loc) -> None:
        # Keys merged with `<<: *anchor` keep only their parent's line.
        seen: set[str] = set()
        for key, value in node.value:
            name, line = str(key.value), key.start_mark.line + 1
            if name in seen:
                self.problems.append((line, _fmt(path + (name,), "duplicate key")))
            seen.add(name)
            self.lines[path + (name,)] = line
            self.walk(value, path + (name,))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        return f"invalid YAML: {problem} (line {exc.problem_mark.line + 1})"
    return f"invalid YAML: {exc}"


def _read_yaml(text: str, env: Mapping[str, str], source: str) -> tuple[Any, _Walker]:
    loader = yaml.SafeLoader(text)
    walker = _Walker(env)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, walker
        walker.lines[()] = node.start_mark.line + 1
        walker.walk(node, ())
        return loader.construct_document(node), walker
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc)], source) from exc
    finally:
        loader.dispose()


# --- errors ------------------------------------------------------------------------


def _fmt(loc: Loc, msg: str) -> str:
    return f"{format_loc(loc)}: {msg}" if loc else msg


def _line_for(loc: Loc, lines: Mapping[Loc, int]) -> int:
    for n in range(len(loc), -1, -1):  # nearest parent that has a node
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "model_type": "expected a mapping",
    "dict_type": "expected a mapping",
    "tuple_type": "expected a list",
    "too_short": "must not be empty",
}


def _pydantic_problems(exc: ValidationError) -> list[tuple[Loc, str]]:
    out: list[tuple[Loc, str]] = []
    for err in exc.errors(include_url=False, include_input=False):
        if err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
        else:
            msg = _MESSAGES.get(err["type"], err["msg"])
        out.append((tuple(err["loc"]), msg))
    return out


def _not_under(reported: list[tuple[Loc, str]], problems: list[tuple[Loc, str]]) -> list[tuple[Loc, str]]:
    """`problems` but those at or below a place already `reported` (a model the catalog
    could not price is missing its prices too: one error says why)."""
    places = [loc for loc, _ in reported]
    return [(loc, msg) for loc, msg in problems if not any(loc[: len(p)] == p for p in places)]


# --- entry points ------------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    config: Config
    lines: Mapping[Loc, int] = field(default_factory=dict)  # each path's line in the file
    expansions: Mapping[Loc, Expansion] = field(default_factory=dict)


def parse_config(text: str, env: Mapping[str, str] | None = None, source: str = "<string>") -> Config:
    """Parse YAML text into a Config; `env` defaults to a snapshot of os.environ."""
    return parse_detailed(text, env, source).config


def parse_detailed(text: str, env: Mapping[str, str] | None = None, source: str = "<string>") -> Parsed:
    """`parse_config`, with the lines and the expansions the file had."""
    env = dict(os.environ) if env is None else env
    data, walker = _read_yaml(text, env, source)
    found = reference_errors(data)
    data, unpriced = prices.resolve(data)
    config: Config | None = None
    try:
        config = Config.model_validate(data, context={DEFER_REFERENCE_CHECKS: True})
    except ValidationError as exc:
        found = _not_under(unpriced, _pydantic_problems(exc)) + found
    found = unpriced + found
    problems = walker.problems + [(_line_for(loc, walker.lines), _fmt(loc, msg)) for loc, msg in found]
    if problems or config is None:
        problems.sort(key=lambda p: p[0])  # stable: file order, then discovery order
        raise ConfigError([f"{msg} (line {line})" for line, msg in problems], source)
    return Parsed(config, walker.lines, walker.expansions)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    return read_config(path, env).config


def read_config(path: str | Path, env: Mapping[str, str] | None = None) -> Parsed:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read config: {exc}"], str(path)) from exc
    return parse_detailed(text, env, source=str(path))


def explain_prices(config: Config) -> list[str]:
    """Each model's effective prices, markup applied: what `config check` prints."""
    lines = ["effective prices, USD per 1M tokens (markup applied; past a long-context threshold, the whole request):"]
    for name, model in config.models.items():
        lines.append(f"  {name}:")
        lines += [f"    {line}" for line in price_of(model.price, config.markup_for(name)).describe()]
    return lines


def explain_catalog(config: Config) -> list[str]:
    """Which catalog version priced which models, and what of theirs is not metered."""
    entries = {name: catalog_entry(config, name) for name, m in config.models.items() if m.price.source == "catalog"}
    if not entries:
        return []
    as_of = next(iter(entries.values())).as_of
    lines = [f"{prices.CATALOG} (bundled, never updated at run time; prices of {as_of}) priced:"]
    for name, entry in entries.items():
        via = f" (from {entry.via})" if entry.via else ""
        change = f"; the catalog changes its price on {entry.next_change}: reload then" if entry.next_change else ""
        lines.append(f"  {name}: {entry.provider}/{entry.model_id}{via}{change}")
        if entry.unmetered:
            lines.append("    not metered here: " + ", ".join(f"{k} {v}" for k, v in entry.unmetered.items()))
    return lines


def catalog_entry(config: Config, model: str) -> prices.Entry:
    """The catalog entry a configured `price: catalog` model was priced from."""
    return prices.lookup(config.upstream_model(model), config.upstreams[config.models[model].upstream].provider)
