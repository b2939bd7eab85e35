"""Deterministic English-like text (with code, CJK and numbers) for token-count tests."""

from __future__ import annotations

import random

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "metering",
    "proxy",
    "request",
    "response",
    "token",
    "budget",
    "latency",
    "upstream",
    "stream",
    "chunk",
    "billing",
    "account",
    "configuration",
    "deployment",
    "kubernetes",
    "database",
    "transaction",
    "serialization",
    "concurrency",
    "def",
    "return",
    "class",
    "import",
    "None",
    "self",
    "async",
    "await",
    "yield",
    "lambda",
    "{}",
    "[]",
    "()",
    "==",
    "!=",
    "<=",
    ">=",
    "+=",
    "->",
    "::",
    "Über",
    "café",
    "naïve",
    "résumé",
    "東京",
    "数据",
    "テスト",
    "42",
    "3.14159",
    "2024-01-01",
    "0x1F",
    "user@example.com",
]


def realistic_text(n_chars: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_chars:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25)))
        sentence = sentence.capitalize() + rng.choice([". ", ".\n", "? ", "!\n\n", ", "])
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


def _dense(kind: int, n_chars: int, rng: random.Random) -> str:
    if kind == 0:  # CJK, about a token a character
        return "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(n_chars))
    if kind == 1:  # digits: a token every 2 characters
        return "".join(rng.choice("0123456789") + " " for _ in range(n_chars // 2))
    # code-like noise: short identifiers and punctuation
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789(){}[];:.,=+-*/<>_") for _ in range(n_chars))


def heterogeneous_text(n_chars: int, seed: int = 11) -> str:
    """English for the first 100k characters, then blocks of 25k characters: 10k of
    English, where an extrapolation samples (every 25k or 100k past the first 100k),
    then 15k of dense text (CJK, digits, code in turn), where it does not look."""
    rng = random.Random(seed)
    out = [realistic_text(100_000, seed)]
    size, block = 100_000, 0
    while size < n_chars:
        piece = realistic_text(10_000, seed + block) + _dense(block % 3, 15_000, rng)
        out.append(piece)
        size += len(piece)
        block += 1
    return "".join(out)[:n_chars]
