"""Stream framings: SSE events and keep-alives on long silences."""

from __future__ import annotations

import asyncio

from servelet.gateway.framing import SSE_KEEPALIVE, sse, with_keepalive


def test_sse_event_is_json_data_and_ends_with_a_blank_line():
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    assert sse({"x": "é"}, event="token") == 'event: token\ndata: {"x":"é"}\n\n'.encode()


def test_multi_line_data_is_split_into_data_lines():
    assert sse("one\ntwo") == b"data: one\ndata: two\n\n"


async def test_keepalive_fills_silences_and_passes_every_item_in_order():
    async def slow():
        yield b"first"
        await asyncio.sleep(0.35)
        yield b"second"

    out = [item async for item in with_keepalive(slow(), SSE_KEEPALIVE, seconds=0.1)]
    assert out[0] == b"first" and out[-1] == b"second"
    assert out.count(SSE_KEEPALIVE) >= 2
    assert set(out[1:-1]) == {SSE_KEEPALIVE}


async def test_leaving_early_closes_the_source_stream():
    closed = asyncio.Event()

    async def endless():
        try:
            while True:
                yield b"tick"
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    stream = with_keepalive(endless(), SSE_KEEPALIVE, seconds=1.0)
    async for item in stream:
        assert item == b"tick"
        break
    await stream.aclose()
    assert closed.is_set()


async def test_cancelling_the_consumer_mid_wait_closes_the_source():
    """A client that disconnects cancels the response task while it waits for the next token."""
    closed = asyncio.Event()

    async def silent():
        try:
            yield b"first"
            await asyncio.sleep(60)
            yield b"never"
        finally:
            closed.set()

    async def consume():
        async for _ in with_keepalive(silent(), SSE_KEEPALIVE, seconds=30):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert closed.is_set()
