"""Stream framings: SSE events, and the streaming response's keep-alives on long silences."""

from __future__ import annotations

import asyncio

from servelet.gateway.framing import SSE, SSE_KEEPALIVE, ClosingStreamingResponse, sse


def test_sse_event_is_json_data_and_ends_with_a_blank_line():
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    assert sse({"x": "é"}, event="token") == 'event: token\ndata: {"x":"é"}\n\n'.encode()


def test_multi_line_data_is_split_into_data_lines():
    assert sse("one\ntwo") == b"data: one\ndata: two\n\n"


async def _stream(items, *, disconnect_after: float | None = None, seconds: float = 0.1) -> list[dict]:
    """Run a keep-alive response as uvicorn would; the ASGI messages it sent, in order."""
    sent: list[dict] = []

    async def receive():
        if disconnect_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    response = ClosingStreamingResponse(items, media_type=SSE, keepalive=SSE_KEEPALIVE, keepalive_seconds=seconds)
    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    return sent


def _bodies(sent: list[dict]) -> list[bytes]:
    return [m["body"] for m in sent if m["type"] == "http.response.body" and m["more_body"]]


async def test_keepalive_fills_silences_and_passes_every_item_in_order():
    async def slow():
        yield b"first"
        await asyncio.sleep(0.35)
        yield b"second"

    sent = await _stream(slow())
    out = _bodies(sent)
    assert out[0] == b"first" and out[-1] == b"second"
    assert out.count(SSE_KEEPALIVE) >= 2
    assert set(out[1:-1]) == {SSE_KEEPALIVE}
    assert sent[0]["type"] == "http.response.start" and sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_no_keepalive_while_items_come_faster_than_the_silence_allowed():
    async def steady():
        for _ in range(10):
            yield b"tick"
            await asyncio.sleep(0.03)

    assert _bodies(await _stream(steady(), seconds=0.1)) == [b"tick"] * 10


async def test_nothing_is_sent_after_the_answer_ends():
    async def quick():
        yield b"only"

    sent = await _stream(quick(), seconds=0.01)
    await asyncio.sleep(0.05)  # a keep-alive still pending would land here
    assert sent[-1]["more_body"] is False
    assert _bodies(sent) == [b"only"]


async def test_a_client_that_disconnects_closes_the_source_stream():
    closed = asyncio.Event()

    async def endless():
        try:
            while True:
                yield b"tick"
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    sent = await asyncio.wait_for(_stream(endless(), disconnect_after=0.1, seconds=1.0), timeout=5)
    assert closed.is_set()
    assert set(_bodies(sent)) == {b"tick"}


async def test_cancelling_the_response_mid_wait_closes_the_source():
    """A server shutting down cancels the response task while it waits for the next token."""
    closed = asyncio.Event()

    async def silent():
        try:
            yield b"first"
            await asyncio.sleep(60)
            yield b"never"
        finally:
            closed.set()

    task = asyncio.create_task(_stream(silent(), seconds=30))
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert closed.is_set()
