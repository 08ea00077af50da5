"""The stream channel (instance/channel*.py): many streamed calls to one real `servelet container` on one
WebSocket, as the gateway makes them; the gateway's route tests run over it too."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import orjson
import pytest
from conftest import start_instance, stop_instance
from websockets.asyncio.client import unix_connect
from websockets.exceptions import ConnectionClosed

from servelet.instance.channel import (
    BODY, MAX_CHANNEL_BODY_BYTES, PATH, REQUEST, ChannelProtocolError, frame, frames, parse_request, request_frame,
)
from servelet.instance.channel_client import ChannelAnswer, StreamChannel
from servelet.instance.client import InstanceClient, iter_json_lines
from servelet.instance.stream import StreamedAnswer
from servelet.settings import GatewaySettings

SLOTS = 4


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    """Four sequences at a time and no queue, so a fifth call is refused while four run."""
    env = {"SERVELET_MAX_BATCH_SIZE": str(SLOTS), "SERVELET_MAX_WAITING": "0", "OPTION_MAX_MODEL_LEN": "1024"}
    running = start_instance(tmp_path_factory.mktemp("channel"), env=env, unix_socket=True)
    yield running
    stop_instance(running)


def stream_body(inputs: str, new_tokens: int, **parameters) -> bytes:
    return orjson.dumps({"inputs": inputs, "parameters": {"max_new_tokens": new_tokens} | parameters, "stream": True})


LONG = stream_body("Once upon a time", 400, ignore_eos=True)
JSON = {"Content-Type": "application/json"}


async def running_sequences(instance) -> int:
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=instance.address[5:]), base_url="http://i") as http:
        return (await http.get("/ping")).json()["running"]


async def wait_until_idle(instance, seconds: float = 10.0) -> int:
    deadline = time.monotonic() + seconds
    while (running := await running_sequences(instance)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return running


def test_frames_round_trip_and_a_cut_frame_is_refused():
    message = request_frame(7, "/invocations", {"Accept": "a/b"}, b'{"x": 1}') + frame(7, BODY, b"chunk")
    parsed = list(frames(message))
    assert [(stream_id, kind) for stream_id, kind, _ in parsed] == [(7, REQUEST), (7, BODY)]
    assert parse_request(parsed[0][2]) == ("/invocations", [("Accept", "a/b")], b'{"x": 1}')
    assert parsed[1][2] == b"chunk"
    with pytest.raises(ChannelProtocolError, match="claims 5 bytes"):
        list(frames(message[:-1]))
    with pytest.raises(ChannelProtocolError, match="does not start with /"):
        parse_request(request_frame(1, "invocations", {}, b"")[9:])


async def test_concurrent_streams_share_one_channel_and_each_arrives_whole(instance):
    client = InstanceClient(instance.address, timeout=60)
    words = ["apple", "river", "guitar", "tiger"]

    async def one(word: str) -> tuple[ChannelAnswer, list[dict]]:
        async with client.open_stream(stream_body(f"{word}, {word}, {word}, {word},", 12), JSON) as answer:
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/jsonlines")
            return answer, [line async for line in iter_json_lines(answer.aiter_raw())]

    try:
        results = await asyncio.gather(*(one(word) for word in words))
    finally:
        await client.aclose()
    assert all(isinstance(answer, ChannelAnswer) for answer, _ in results)
    assert len({id(answer.connection) for answer, _ in results}) == 1
    for word, (_, lines) in zip(words, results):
        assert len(lines) == 12
        assert lines[-1]["generated_text"] == "".join(line["token"]["text"] for line in lines)
        assert word in lines[-1]["generated_text"]


async def test_refusals_answer_their_error_and_leaving_a_stream_frees_its_slot(instance):
    client = InstanceClient(instance.address, timeout=60)
    try:
        async with client.open_stream(b'{"inputs": "hel', JSON) as broken:
            assert broken.status_code == 400 and "not valid JSON" in orjson.loads(await broken.aread())["error"]
        async with contextlib.AsyncExitStack() as streams:
            for _ in range(SLOTS):
                answer = await streams.enter_async_context(client.open_stream(LONG, JSON))
                await anext(answer.aiter_raw())  # its sequence runs
            async with client.open_stream(stream_body("Hello", 2), JSON) as refused:
                assert refused.status_code == 429 and "overloaded" in orjson.loads(await refused.aread())["error"]
        # The four streams were left after a token or two of 400: their generations must stop.
        assert await wait_until_idle(instance) == 0
        async with client.open_stream(stream_body("Hello", 2), JSON) as served:
            assert served.status_code == 200 and len(await served.aread()) > 0
    finally:
        await client.aclose()


async def test_a_closed_channel_ends_its_streams_and_the_next_call_opens_another(instance):
    channel = StreamChannel(instance.address)
    async with channel.open_stream("/invocations", LONG, JSON, 60) as answer:
        chunks = answer.aiter_raw()
        await anext(chunks)
        await channel.aclose()
        with pytest.raises(httpx.ReadError, match="channel to the instance closed"):
            async for _ in chunks:
                pass
    assert await wait_until_idle(instance) == 0  # a closed channel is a disconnect of every stream on it
    async with channel.open_stream("/invocations", stream_body("Hello", 3), JSON, 60) as again:
        assert again.status_code == 200 and again.connection is not answer.connection
        assert len([line async for line in iter_json_lines(again.aiter_raw())]) == 3
    await channel.aclose()


async def test_calls_made_together_leave_in_one_message(instance):
    """The requests of one event-loop turn go to the instance as one WebSocket message: a message each cost the
    gateway a write and websockets' framing per call."""
    channel = StreamChannel(instance.address)
    async with channel.open_stream("/invocations", stream_body("Hello", 1), JSON, 60) as first:
        await first.aread()
    sent: list[bytes] = []
    send = first.connection.send

    async def counted(message, **options):
        sent.append(message)
        await send(message, **options)

    first.connection.send = counted

    async def one(word: str) -> int:
        async with channel.open_stream("/invocations", stream_body(word, 2), JSON, 60) as answer:
            return len([line async for line in iter_json_lines(answer.aiter_raw())])

    try:
        assert await asyncio.gather(*(one(word) for word in ("apple", "river", "tiger"))) == [2, 2, 2]
    finally:
        await channel.aclose()
    assert [[kind for _, kind, _ in frames(message)] for message in sent] == [[REQUEST] * 3]


TWICE = request_frame(1, "/invocations", JSON, LONG) * 2  # one stream id opened twice


@pytest.mark.parametrize(
    "message", [b"\x00\x00\x00\x01\x01\x00\x00\x00\x09abc", "text", TWICE], ids=["cut-frame", "text", "id-reused"]
)
async def test_a_malformed_message_closes_the_channel_with_a_protocol_error(instance, message):
    async with unix_connect(instance.address[5:], uri=f"ws://instance{PATH}") as websocket:
        await websocket.send(message)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(websocket.recv(), 10)
    assert closed.value.rcvd.code == 1002


async def test_an_instance_without_the_channel_gets_a_connection_per_stream(tmp_path):
    """Another container speaking only the hosting contract: its 404 to the handshake is remembered."""
    path = tmp_path / "other.sock"
    heads: list[bytes] = []

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        if head.startswith(b"GET"):
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        else:
            await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/jsonlines\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    client = InstanceClient(f"unix:{path}", timeout=10)
    try:
        for _ in range(2):
            async with client.open_stream(b'{"inputs": "x"}', JSON) as answer:
                assert isinstance(answer, StreamedAnswer) and await answer.aread() == b"{}"
    finally:
        await client.aclose()
        server.close()
    assert [head.split(b" ")[0] for head in heads] == [b"GET", b"POST", b"POST"]  # the handshake is tried once


async def test_a_large_body_or_the_channel_turned_off_gets_a_connection_of_its_own(instance):
    on, off = InstanceClient(instance.address, timeout=60), InstanceClient(instance.address, timeout=60, stream_channel=False)
    large = orjson.dumps({"inputs": "word " * (MAX_CHANNEL_BODY_BYTES // 5), "stream": True})
    try:
        async with on.open_stream(large, JSON) as answer:  # over the channel's limit: too long for the model, too
            assert isinstance(answer, StreamedAnswer) and answer.status_code in (400, 413, 422)
        async with off.open_stream(stream_body("Hello", 3), JSON) as answer:
            assert isinstance(answer, StreamedAnswer) and answer.status_code == 200
            assert len([line async for line in iter_json_lines(answer.aiter_raw())]) == 3
    finally:
        await on.aclose()
        await off.aclose()


def test_the_gateway_setting_turns_the_channel_off(monkeypatch):
    assert GatewaySettings().stream_channel is True
    monkeypatch.setenv("SERVELET_STREAM_CHANNEL", "false")
    assert GatewaySettings().stream_channel is False
