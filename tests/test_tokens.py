"""Tests for proxy.tokens: offline encodings, bounded counting, streamed output."""

from __future__ import annotations

import os
import random
import socket
import tempfile
from pathlib import Path

# Point tiktoken's cache at an empty dir before anything loads, to prove the
# encodings come from the packaged files, not a cache or a download.
_EMPTY_CACHE = tempfile.mkdtemp(prefix="tiktoken-empty-cache-")
os.environ["TIKTOKEN_CACHE_DIR"] = _EMPTY_CACHE

import time

import pytest
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public  # type: ignore[import-untyped]

from proxy import tokens
from proxy.tokens import (
    EXACT_CHAR_BOUND,
    EncodingIntegrityError,
    OutputCounter,
    bound_text,
    count_text,
    encoding_for_model,
    get_encoding,
    measure,
)

from .sample_text import heterogeneous_text, realistic_text

# Hashes as published in tiktoken_ext/openai_public.py.
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


def _exact(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode_ordinary(text))


@pytest.fixture(scope="module")
def o200k() -> tiktoken.Encoding:
    return get_encoding("o200k_base")


# ---------------------------------------------------------------- encodings


def test_expected_hashes_come_from_tiktoken() -> None:
    source = Path(openai_public.__file__).read_text(encoding="utf-8")
    assert O200K_SHA256 in source
    assert CL100K_SHA256 in source


def test_offline_loader_checks_tiktoken_hash() -> None:
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    ranks = tokens._offline_load_bpe(url, expected_hash=CL100K_SHA256)
    assert len(ranks) == 100256
    with pytest.raises(EncodingIntegrityError, match="sha256"):
        tokens._offline_load_bpe(url, expected_hash="0" * 64)
    with pytest.raises(EncodingIntegrityError):
        tokens._offline_load_bpe(url.replace("cl100k", "p50k"), expected_hash="0" * 64)


def test_build_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network/cache access attempted")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    get_encoding.cache_clear()
    try:
        enc = get_encoding("cl100k_base")
    finally:
        get_encoding.cache_clear()
    assert enc.encode_ordinary("hello world") == [15339, 1917]
    assert openai_public.load_tiktoken_bpe is tiktoken.load.load_tiktoken_bpe  # swap restored
    assert os.listdir(_EMPTY_CACHE) == []


@pytest.mark.parametrize(
    ("name", "ids", "n_vocab"),
    [("o200k_base", [24912, 2375], 200019), ("cl100k_base", [15339, 1917], 100277)],
)
def test_hello_world_ids(name: str, ids: list[int], n_vocab: int) -> None:
    enc = get_encoding(name)
    assert enc.name == name
    assert enc.n_vocab == n_vocab
    assert enc.encode_ordinary("hello world") == ids
    assert enc.decode(ids) == "hello world"
    assert [enc.decode_single_token_bytes(i) for i in ids] == [b"hello", b" world"]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [enc.eot_token]
    assert get_encoding(name) is enc  # cached
    assert os.listdir(_EMPTY_CACHE) == []


def test_unknown_encoding_name() -> None:
    with pytest.raises(ValueError):
        get_encoding("p50k_base")
    with pytest.raises(ValueError):
        get_encoding("nope")


# ---------------------------------------------------------------- models


def test_model_mapping() -> None:
    assert encoding_for_model("gpt-4o").name == "o200k_base"
    assert encoding_for_model("gpt-4o-mini-2024-07-18").name == "o200k_base"
    assert encoding_for_model("gpt-4").name == "cl100k_base"
    assert encoding_for_model("openai/gpt-4").name == "cl100k_base"
    assert encoding_for_model("gpt-4o", configured="cl100k_base").name == "o200k_base"
    assert encoding_for_model("gpt-4o") is encoding_for_model("gpt-4o")


def test_unknown_model_falls_back() -> None:
    assert encoding_for_model("llama-3-70b").name == "o200k_base"
    assert encoding_for_model("llama-3-70b", configured="cl100k_base").name == "cl100k_base"
    assert encoding_for_model("llama-3-70b", configured="o200k_harmony").name == "o200k_base"
    assert encoding_for_model("").name == "o200k_base"
    assert encoding_for_model(None).name == "o200k_base"  # type: ignore[arg-type]
    assert encoding_for_model("x" * 1_000_000).name == "o200k_base"
    with pytest.raises(ValueError):
        encoding_for_model("llama-3-70b", configured="typo_base")


def test_unshipped_model_encodings_map_to_shipped() -> None:
    assert encoding_for_model("davinci").name == "cl100k_base"  # r50k_base
    assert encoding_for_model("text-davinci-003").name == "cl100k_base"  # p50k_base
    assert encoding_for_model("gpt-oss-120b").name == "o200k_base"  # o200k_harmony


# ---------------------------------------------------------------- count_text


def test_count_text_exact_below_bound(o200k: tiktoken.Encoding) -> None:
    text = realistic_text(EXACT_CHAR_BOUND)
    assert count_text(o200k, text) == _exact(o200k, text)
    assert count_text(o200k, "") == 0
    assert count_text(o200k, "<|endoftext|>") == _exact(o200k, "<|endoftext|>")  # no raise


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_huge_prompt_is_bounded_upper_estimate(name: str) -> None:
    enc = get_encoding(name)
    text = realistic_text(5_000_000)
    exact = _exact(enc, text)
    estimate = count_text(enc, text)
    assert exact <= estimate <= 2 * exact


def test_dense_tail_not_undercounted(o200k: tiktoken.Encoding) -> None:
    # Cheap English prefix, then token-dense noise: spot samples must catch it.
    rng = random.Random(3)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789+/=") for _ in range(2_000_000))
    text = realistic_text(EXACT_CHAR_BOUND) + noise
    exact = _exact(o200k, text)
    estimate = count_text(o200k, text)
    assert exact <= estimate <= 2 * exact


def test_without_a_safe_cut_the_bound_is_every_byte(o200k: tiktoken.Encoding) -> None:
    text = "a" * (EXACT_CHAR_BOUND + 10) + "\ud800"  # no safe cut before the bound; a lone surrogate is valid JSON
    counted = measure(o200k, [text])
    assert counted.bound == EXACT_CHAR_BOUND + 10 + 3 == bound_text(o200k, text)
    assert _exact(o200k, text) <= counted.estimate <= counted.bound


# ---------------------------------------------------------------- output counter


def test_output_counter(o200k: tiktoken.Encoding) -> None:
    counter = OutputCounter()
    assert counter.count(o200k) == 0
    assert counter.chars == 0
    for chunk in ["Hel", "lo", ", wor", "ld!", "", '{"city":', '"Paris"}']:
        counter.add(chunk)
    full = 'Hello, world!{"city":"Paris"}'
    assert counter.chars == len(full)
    assert counter.count(o200k) == _exact(o200k, full)
    assert counter.count(o200k) == _exact(o200k, full)  # idempotent
    counter.add(" more")
    assert counter.count(o200k) == _exact(o200k, full + " more")


def test_output_counter_huge_is_bounded(o200k: tiktoken.Encoding) -> None:
    text = realistic_text(2_000_000)
    counter = OutputCounter()
    for i in range(0, len(text), 7):
        counter.add(text[i : i + 7])
    exact = _exact(o200k, text)
    assert counter.chars == len(text)
    assert exact <= counter.count(o200k) <= 2 * exact


# ---------------------------------------------------------------- upper bounds


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_the_bound_holds_wherever_the_exact_part_stops(name: str) -> None:
    enc = get_encoding(name)
    rng = random.Random(5)
    alphabet = [*"abcXYZé東京テ 0123456789'’\n\t.,;:/+=-_()\"\u0301\ud800", "\r\n", "'s", "  \n", "12345"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        exact = _exact(enc, text)
        for budget in range(len(text) + 1):
            counted = measure(enc, [text], budget=budget)
            assert counted.bound >= exact, (text, budget)
            assert counted.estimate <= counted.bound


@pytest.mark.parametrize("chars", [200_000, 500_000])
def test_a_heterogeneous_prompt_is_bounded_not_extrapolated(o200k: tiktoken.Encoding, chars: int) -> None:
    text = heterogeneous_text(chars)  # dense where an extrapolation does not sample
    exact = _exact(o200k, text)
    counted = measure(o200k, [text])
    print(f"{chars} chars: real {exact}, bound {counted.bound} ({counted.bound / exact:.2f}x), "
          f"estimate {counted.estimate} ({exact / counted.estimate:.2f}x below)")  # fmt: skip
    assert exact <= counted.bound <= 2 * exact


def test_the_bound_of_10_mb_costs_little_cpu(o200k: tiktoken.Encoding) -> None:
    text = realistic_text(10_000_000)
    started = time.process_time()
    counted = measure(o200k, [text])
    print(f"10 MB prompt: bound and estimate in {(time.process_time() - started) * 1000:.1f} ms of CPU")
    assert counted.bound >= counted.estimate > 0  # a figure, not a timed assertion


def test_remembered_counts_are_tiktokens_own(o200k: tiktoken.Encoding) -> None:
    """A prompt text seen before is counted from the memo: the same count as
    tokenizing it, for the text itself and for texts that differ from it by a byte."""
    rng = random.Random(7)
    words = ["sea", "ship", " ", "\n", "naïve", "数据", "🙂", "12", "3.5", "don't"]
    base = "".join(rng.choice(words) for _ in range(2_000))
    variants = [base, base + "!", "!" + base[1:], base[:-1], base.replace("sea", "SEA", 1)]
    for _ in range(2):  # the second pass answers from the memo
        for text in variants:
            assert tokens.measure(o200k, [text], remember=True) == tokens.measure(o200k, [text])
    assert all(text in tokens._memo(o200k).counts for text in variants)


def test_the_memo_is_bounded_and_keeps_what_is_used(o200k: tiktoken.Encoding, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "MEMO_MAX_CHARS", 10 * tokens.MEMO_MIN_CHARS)
    monkeypatch.setitem(tokens._MEMOS, o200k.name, tokens._Memo())
    memo = tokens._memo(o200k)
    texts = [f"{i:04d} " + "word " * (tokens.MEMO_MIN_CHARS // 5) for i in range(30)]  # ~9 fit
    system_prompt, short = texts[0], "short text"
    for text in texts[1:]:
        tokens.measure(o200k, [system_prompt, text, short], remember=True)  # as every request sends it
        assert memo.chars <= tokens.MEMO_MAX_CHARS
        assert memo.chars == sum(map(len, memo.counts))
    assert system_prompt in memo.counts  # used by every request: never the oldest
    assert texts[1] not in memo.counts and texts[-1] in memo.counts
    assert short not in memo.counts  # too short to be worth holding
