"""The incremental SSE parser, against the WHATWG rules openai-python follows."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.sse import SSEParser


def feed_all(chunks: list[bytes]) -> list[tuple[str | None, bytes]]:
    parser = SSEParser()
    events = []
    for chunk in chunks:
        events += [(e.event, e.data) for e in parser.feed(chunk)]
    last, _ = parser.finish()
    return events + [(e.event, e.data) for e in last]


def test_lf_crlf_and_cr_line_ends() -> None:
    for end in (b"\n", b"\r\n", b"\r"):
        stream = b"data: one" + end + end + b"event: x" + end + b"data: two" + end + end
        assert feed_all([stream]) == [(None, b"one"), ("x", b"two")]


def test_comments_ignored_and_multiline_data_joined() -> None:
    stream = b": keep-alive\n\ndata: a\ndata: b\n: note\n\ndata:no-space\n\n"
    assert feed_all([stream]) == [(None, b""), (None, b"a\nb"), (None, b"no-space")]


def test_raw_bytes_forwarded_are_whole_events() -> None:
    parser = SSEParser()
    events = parser.feed(b'data: {"a": 1}\r\n\r\ndata: [DO')
    assert [e.raw for e in events] == [b'data: {"a": 1}\n\n']
    assert parser.feed(b"NE]\n\n")[0].data == b"[DONE]"
    assert parser.finish() == ([], b"")


@given(
    st.lists(
        st.binary(min_size=0, max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b), min_size=1, max_size=8
    ),
    st.data(),
)
def test_any_split_gives_the_same_events(payloads: list[bytes], data: st.DataObject) -> None:
    end = data.draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    stream = b"".join(b"data: " + p + end + end for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    expected = [(None, p) for p in payloads]  # "data: " loses exactly its one space
    assert feed_all(chunks) == expected
