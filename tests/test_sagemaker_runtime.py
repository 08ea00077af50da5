"""The SageMaker runtime API through the gateway: boto3 code written for SageMaker works by changing endpoint_url."""

from __future__ import annotations

import json
import os
import signal
import zlib

import boto3
import botocore.eventstream
import botocore.exceptions
import botocore.parsers
import pytest
from botocore.config import Config
from conftest import start_gateway, stop_process, wait_for

from servelet.errors import GatewayError, Unavailable
from servelet.gateway import framing
from servelet.gateway.api.sagemaker import render_sagemaker_error

PROMPT = "The capital of France is"
GREEDY = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}


def sagemaker(base_url: str, config: Config | None = None):
    return boto3.client(
        "sagemaker-runtime", endpoint_url=base_url, region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="x", config=config,
    )


@pytest.fixture(scope="module")
def client(gateway):
    return sagemaker(gateway.base_url)


def invoke(client, body: dict, **kwargs) -> dict:
    answer = client.invoke_endpoint(EndpointName="default", Body=json.dumps(body), ContentType="application/json", **kwargs)
    return answer | {"Body": json.loads(answer["Body"].read())}


def payload_parts(answer) -> list[bytes]:
    return [event["PayloadPart"]["Bytes"] for event in answer["Body"]]


# -- InvokeEndpoint -------------------------------------------------------------------------------------
def test_invoke_endpoint_answers_the_generated_text(client):
    answer = invoke(client, GREEDY, Accept="application/json")
    assert answer["ContentType"].startswith("application/json")
    assert answer["InvokedProductionVariant"] == "AllTraffic"
    assert answer["Body"]["generated_text"].strip()


def test_a_list_of_inputs_answers_a_list(client):
    answer = invoke(client, {"inputs": [PROMPT, "One, two, three,"], "parameters": {"max_new_tokens": 4}})
    assert isinstance(answer["Body"], list) and len(answer["Body"]) == 2
    assert all(a["generated_text"].strip() for a in answer["Body"])


def test_sagemaker_headers_are_accepted(client):
    """Custom attributes, an inference id and a pinned variant travel with the request; the answer is unchanged."""
    plain = invoke(client, GREEDY)
    pinned = invoke(client, GREEDY, CustomAttributes="trace=42", InferenceId="req-1", TargetVariant="AllTraffic")
    assert pinned["Body"] == plain["Body"]
    assert pinned["InvokedProductionVariant"] == "AllTraffic"


# -- InvokeEndpointWithResponseStream ---------------------------------------------------------------
def test_streamed_answer_reassembles_into_the_greedy_text(client):
    whole = invoke(client, GREEDY)["Body"]["generated_text"]
    answer = client.invoke_endpoint_with_response_stream(
        EndpointName="default", Body=json.dumps(GREEDY), ContentType="application/json", Accept="application/jsonlines"
    )
    assert answer["ContentType"] == "application/jsonlines"
    assert answer["InvokedProductionVariant"] == "AllTraffic"
    lines = [json.loads(part) for part in payload_parts(answer)]
    assert len(lines) == 8  # one token per line, one line per PayloadPart
    assert "".join(line["token"]["text"] for line in lines) == whole
    assert lines[-1]["generated_text"] == whole
    assert lines[-1]["details"]["finish_reason"] == "length"


def test_streaming_route_sends_event_stream_headers_unbuffered(gateway):
    with gateway.http(timeout=60) as http:
        response = http.post("/endpoints/default/invocations-response-stream", json=GREEDY)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/vnd.amazon.eventstream"
    assert response.headers["x-amzn-sagemaker-content-type"] == "application/jsonlines"
    assert response.headers["x-accel-buffering"] == "no"


# -- errors boto3 maps to its exception classes ---------------------------------------------------------
def test_unknown_endpoint_is_a_validation_error(client):
    with pytest.raises(client.exceptions.ValidationError, match="Endpoint nope of account .* not found"):
        client.invoke_endpoint(EndpointName="nope", Body=json.dumps(GREEDY))
    with pytest.raises(client.exceptions.ValidationError, match="Endpoint nope of account .* not found"):
        client.invoke_endpoint_with_response_stream(EndpointName="nope", Body=json.dumps(GREEDY))


def test_unknown_target_variant_is_a_validation_error(client):
    with pytest.raises(client.exceptions.ValidationError, match="variant 'Blue' is not on endpoint 'default'"):
        client.invoke_endpoint(EndpointName="default", Body=json.dumps(GREEDY), TargetVariant="Blue")


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
def test_a_bad_parameter_is_a_model_error_with_the_instance_message(client, stream):
    body = json.dumps({"inputs": PROMPT, "parameters": {"temperature": -1}})
    call = client.invoke_endpoint_with_response_stream if stream else client.invoke_endpoint
    with pytest.raises(client.exceptions.ModelError) as raised:
        call(EndpointName="default", Body=body, ContentType="application/json")
    error = raised.value.response
    assert error["OriginalStatusCode"] == 422
    assert "parameters.temperature" in error["OriginalMessage"]
    assert "parameters.temperature" in error["Error"]["Message"]


def test_a_body_that_is_not_json_is_a_validation_error(client):
    with pytest.raises(client.exceptions.ValidationError, match="not valid JSON"):
        client.invoke_endpoint(EndpointName="default", Body=b"{inputs: oops", ContentType="application/json")


def test_a_content_type_the_model_does_not_take_is_a_validation_error(client):
    with pytest.raises(client.exceptions.ValidationError, match="Content-Type 'text/csv' is not supported"):
        client.invoke_endpoint(EndpointName="default", Body=b"1,2,3", ContentType="text/csv")


def test_a_body_over_6_mb_is_a_validation_error(client):
    with pytest.raises(client.exceptions.ValidationError, match="limit is 6291456"):
        client.invoke_endpoint(EndpointName="default", Body=b"x" * (6 * 1024 * 1024 + 1))


# -- the container contract on `default` -----------------------------------------------------------------
def test_ping_and_invocations_aliases(gateway, client):
    with gateway.http(timeout=60) as http:
        ping = http.get("/ping")
        answer = http.post("/invocations", json=GREEDY)
        refused = http.post("/invocations", json={"inputs": PROMPT, "parameters": {"top_p": 7}})
    assert ping.status_code == 200
    assert answer.status_code == 200
    assert answer.headers["x-amzn-invoked-production-variant"] == "AllTraffic"
    assert answer.json() == invoke(client, GREEDY)["Body"]
    assert refused.status_code == 424 and refused.headers["x-amzn-errortype"] == "ModelError"
    assert "parameters.top_p" in refused.json()["OriginalMessage"]


# -- streams that end early --------------------------------------------------------------------------------

def throttled(client, body: dict) -> bool:
    try:
        client.invoke_endpoint(EndpointName="default", Body=json.dumps(body))
    except botocore.exceptions.ClientError as error:
        if error.response["Error"]["Code"] == "ThrottlingException":
            return True
        raise
    return False


def test_a_full_endpoint_throttles_and_a_client_that_leaves_a_stream_frees_its_slot(tmp_path):
    """One slot and no queue: while a stream holds the slot a request is throttled (429 ThrottlingException);
    once the streaming client leaves, its generation is cancelled (not run to its 2000 tokens) and requests pass."""
    gateway = start_gateway(tmp_path, env={"SERVELET_MAX_BATCH_SIZE": "1", "SERVELET_MAX_WAITING": "0"})
    try:
        client = sagemaker(gateway.base_url, Config(retries={"total_max_attempts": 1}))  # see the 429 itself
        long = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2000, "ignore_eos": True}}
        short = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
        with gateway.http(timeout=60) as http:
            with http.stream("POST", "/endpoints/default/invocations-response-stream", json=long) as stream:
                # Keep the iterator: a dropped httpx iterator closes the response, which would free the slot.
                chunks = stream.iter_bytes()
                first = next(chunks)
                assert b"PayloadPart" in first, first  # a token, not an error: the slot is taken
                with pytest.raises(botocore.exceptions.ClientError) as raised:
                    client.invoke_endpoint(EndpointName="default", Body=json.dumps(short))
                assert raised.value.response["Error"]["Code"] == "ThrottlingException"
                assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert wait_for(lambda: not throttled(client, short), 10), "the generation kept its slot after the client left"
    finally:
        stop_process(gateway.process)


def test_an_instance_that_dies_mid_stream_surfaces_as_model_stream_error(tmp_path):
    """A stream that broke after it began cannot change its HTTP status: botocore raises the ModelStreamError event.
    The dead instance is replaced and the endpoint serves again."""
    gateway = start_gateway(tmp_path)
    try:
        client = sagemaker(gateway.base_url)
        long = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1000, "ignore_eos": True}}
        answer = client.invoke_endpoint_with_response_stream(EndpointName="default", Body=json.dumps(long))
        events = iter(answer["Body"])
        assert "PayloadPart" in next(events)
        os.kill(instance_pid(gateway.process.pid), signal.SIGKILL)
        with pytest.raises(botocore.exceptions.EventStreamError) as raised:
            for _ in events:
                pass
        assert raised.value.response["Error"]["Code"] == "ModelStreamError"
        assert "failed mid-stream" in raised.value.response["Error"]["Message"]
        # The instance is replaced: the endpoint answers again once the new one has loaded the model.
        with gateway.http(timeout=10) as http:
            assert wait_for(lambda: http.get("/ping").status_code == 200, 120)
        assert invoke(client, GREEDY)["Body"]["generated_text"]
    finally:
        stop_process(gateway.process)


def instance_pid(gateway_pid: int) -> int:
    children = open(f"/proc/{gateway_pid}/task/{gateway_pid}/children").read().split()
    assert len(children) == 1, f"expected one instance process, found {children}"
    return int(children[0])


# -- the event-stream framing, read by botocore's own parser ---------------------------------------------
def test_event_message_round_trips_through_botocore_with_correct_crcs():
    message = framing.payload_part(b'{"token": {"text": " Paris"}}\n')
    buffer = botocore.eventstream.EventStreamBuffer()
    for byte in message:  # split anywhere, even inside the prelude
        buffer.add_data(bytes([byte]))
    [event] = list(buffer)
    assert event.headers == {":event-type": "PayloadPart", ":content-type": "application/octet-stream", ":message-type": "event"}
    assert event.payload == b'{"token": {"text": " Paris"}}\n'
    assert event.crc == zlib.crc32(message[:-4])

    corrupted = bytearray(message)
    corrupted[-6] ^= 0xFF  # a payload byte: the message CRC no longer matches
    buffer = botocore.eventstream.EventStreamBuffer()
    buffer.add_data(bytes(corrupted))
    with pytest.raises(botocore.eventstream.ChecksumMismatch):
        list(buffer)


class _Body:
    def __init__(self, data: bytes):
        self.data = data

    def stream(self):
        yield self.data


def test_model_stream_error_event_raises_in_botocore_after_the_parts(client):
    """What a boto3 user iterating the stream sees when the model fails after the first part."""
    operation = client.meta.service_model.operation_model("InvokeEndpointWithResponseStream")
    body = framing.payload_part(b"first") + framing.model_stream_error("the model stopped", "StreamBroken")
    stream = botocore.eventstream.EventStream(
        _Body(body), operation.output_shape.members["Body"], botocore.parsers.EventStreamJSONParser(), operation.name
    )
    events = iter(stream)
    assert next(events) == {"PayloadPart": {"Bytes": b"first"}}
    with pytest.raises(botocore.exceptions.EventStreamError) as raised:
        next(events)
    assert raised.value.response["Error"] == {"Code": "ModelStreamError", "Message": "the model stopped"}


@pytest.mark.parametrize(
    ("error", "code", "exception"),
    [
        (Unavailable("the model is still loading"), "ServiceUnavailable", "ServiceUnavailable"),
        (GatewayError("something broke"), "InternalFailure", "InternalFailure"),
    ],
)
def test_errors_hard_to_provoke_render_as_botocore_reads_them(client, error, code, exception):
    """What the gateway sends for errors hard to provoke on demand, read by botocore's own parser."""
    response = render_sagemaker_error(error)
    parsed = botocore.parsers.RestJSONParser().parse(
        {"status_code": response.status_code, "headers": dict(response.headers), "body": response.body},
        client.meta.service_model.operation_model("InvokeEndpoint").output_shape,
    )
    assert parsed["Error"] == {"Code": code, "Message": error.message}
    assert client.exceptions.from_code(code).__name__ == exception


def test_invocations_alias_passes_a_stream_through_line_by_line(gateway):
    """`"stream": true` on /invocations answers JSON lines as the container does, the first before the last is made."""
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8}, "stream": True}
    with gateway.http(timeout=60) as http, http.stream("POST", "/invocations", json=body) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/jsonlines")
        lines = [json.loads(line) for line in answer.iter_lines() if line]
    assert len(lines) == 8 and all("token" in line for line in lines)
    assert lines[-1]["details"]["generated_tokens"] == 8
    assert "".join(line["token"]["text"] for line in lines) == lines[-1]["generated_text"]
