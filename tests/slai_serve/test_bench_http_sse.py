"""bench-serve --http reads SSE lines on LF only: a server's unescaped U+2028 / U+0085 in generated text
(valid inside a JSON string) must not cut a chunk in two."""

from __future__ import annotations

import asyncio
import json

from slai_serve.bench_http import sse_lines


class FakeResponse:
    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    async def aiter_bytes(self):
        for p in self.parts:
            yield p


def test_sse_lines_split_on_lf_only_and_across_reads():
    text = "a\u2028b\x85c\u2029d"
    event = "data: " + json.dumps({"choices": [{"text": text}]}, ensure_ascii=False) + "\r\n\r\n"
    raw = (event + "data: [DONE]\n\n").encode()
    parts = [raw[:7], raw[7:19], raw[19:]]  # reads that split the event, even inside a UTF-8 sequence

    async def collect():
        return [line async for line in sse_lines(FakeResponse(parts))]

    lines = asyncio.run(collect())
    data = [line for line in lines if line.startswith("data:")]
    assert json.loads(data[0][5:])["choices"][0]["text"] == text
    assert data[1] == "data: [DONE]"
