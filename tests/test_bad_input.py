"""Hand-made bad input, for what the OpenAPI fuzz run (test_fuzz_openapi.py) cannot describe: AWS event-stream
bytes and SigV4 `Authorization` headers, broken WebSocket frames, invalid UTF-8 and JSON, parameters no model
can honour, a 100 MB body. Each is refused with a 4xx naming the problem in its API family's error shape (a
WebSocket: a close code or an error frame), and the gateway stays up: every test ends with a `/ping`.

One gateway with auth on (keys made with `servelet keys create`, as users make them) serving the default model.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from conftest import create_key, start_gateway, stop_process
from error_shapes import family, message, problem
from websockets.client import ClientProtocol
from websockets.frames import Close, Opcode
from websockets.uri import parse_uri

from servelet.gateway.framing import EVENT_STREAM, payload_part

MAX_TOKENS, CONTEXT, PAYLOAD = 64, 256, 6 * 1024 * 1024
SETTINGS = {
    "SERVELET_AUTH": "true",
    "SERVELET_MAX_TOKENS_PER_REQUEST": str(MAX_TOKENS),
    "SERVELET_MAX_MODEL_LEN": str(CONTEXT),
    "SERVELET_MAX_PAYLOAD_BYTES": str(PAYLOAD),
}
TIMEOUT = 60  # seconds for any one answer: past it the gateway hangs, which is a failure too
RUNTIME = "/endpoints/default/invocations"
RUNTIME_STREAM = "/endpoints/default/invocations-response-stream"
AMZ_JSON = "application/x-amz-json-1.1"
LIST_ENDPOINTS = {"X-Amz-Target": "SageMaker.ListEndpoints", "Content-Type": AMZ_JSON}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad-input")
    return {
        "root": root,
        "bearer": create_key(root / "data", "fuzzer", "--scope", "admin", "--scope", "invoke:*")["key"],
        "aws": create_key(root / "data", "fuzzer-aws", "--scope", "admin", "--scope", "invoke:*", "--aws"),
    }


@pytest.fixture(scope="module")
def gateway(keys, model_path):
    running = start_gateway(keys["root"], env=SETTINGS)
    yield running
    stop_process(running.process)


@pytest.fixture(scope="module")
def http(gateway, keys):
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {keys['bearer']}"},
                      timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(autouse=True)
def stays_up(request):
    """After each test the gateway still answers: no bad input takes it down."""
    yield
    if "gateway" in request.fixturenames:
        gateway = request.getfixturevalue("gateway")
        assert gateway.process.poll() is None, gateway.log()[-3000:]
        assert httpx.get(f"{gateway.base_url}/ping", timeout=TIMEOUT).status_code == 200


def refused(response: httpx.Response, method: str, path: str, *names: str, status: int | None = None) -> str:
    """Check a refusal: a 4xx in its family's shape whose message names each of `names`; returns the message."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, response.text[:500]
    kind = family(method, path, response.request.headers)
    headers = {name.lower(): value for name, value in response.headers.items()}
    assert problem(kind, response.content, headers) is None, (kind, response.text[:500])
    said = message(kind, response.content, headers)
    for name in names:
        assert name.lower() in said.lower(), said
    return said


# -- the generative routes, one body shape per family ----------------------------------------------------------
def lmi(prompt: str = "Hello", **parameters) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": 2} | parameters}


def completion(prompt: str = "Hello", **parameters) -> dict:
    return {"model": "default", "prompt": prompt, "max_tokens": 2} | parameters


def chat(prompt: str = "Hello", **parameters) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2} | parameters


# (path, body maker, what a parameter is called there: LMI/TGI name -> this family's name)
ROUTES = [
    (RUNTIME, lmi, {}),
    (RUNTIME_STREAM, lmi, {}),
    ("/invocations", lmi, {}),
    ("/generate", lmi, {}),
    ("/generate_stream", lmi, {}),
    ("/", lmi, {}),
    ("/v1/completions", completion, {"max_new_tokens": "max_tokens"}),
    ("/v1/chat/completions", chat, {"max_new_tokens": "max_tokens"}),
]
ROUTE_IDS = [path for path, _, _ in ROUTES]


def body_with(make, names: dict, prompt: str = "Hello", **parameters) -> dict:
    return make(prompt, **{names.get(name, name): value for name, value in parameters.items()})


@pytest.mark.parametrize(("path", "make", "names"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("tokens", [10**12, 2**70], ids=["1e12", "2^70"])
def test_huge_max_new_tokens_is_refused_naming_the_limit(http, path, make, names, tokens):
    response = http.post(path, json=body_with(make, names, max_new_tokens=tokens))
    refused(response, "POST", path, str(tokens), "SERVELET_MAX_TOKENS_PER_REQUEST")


@pytest.mark.parametrize(("path", "make", "names"), ROUTES, ids=ROUTE_IDS)
def test_a_prompt_longer_than_the_context_is_refused_naming_it(http, path, make, names):
    response = http.post(path, json=body_with(make, names, prompt="word " * (CONTEXT * 4)))
    refused(response, "POST", path, f"context length of {CONTEXT} tokens", "SERVELET_MAX_MODEL_LEN")


# JSON has no NaN or Infinity; Python's json module (and many clients built on it) writes them anyway.
@pytest.mark.parametrize(("path", "make", "names"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("parameter", ["temperature", "top_p", "max_new_tokens"])
def test_nan_and_infinite_parameters_are_refused_naming_the_parameter(http, path, make, names, literal, parameter):
    name = names.get(parameter, parameter)
    body = json.dumps(body_with(make, names, **{parameter: 0.5})).replace('"%s": 0.5' % name, f'"{name}": {literal}')
    assert literal in body
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    refused(response, "POST", path, name, "finite number")


@pytest.mark.parametrize(("path", "make", "names"), ROUTES, ids=ROUTE_IDS)
def test_ten_thousand_stop_sequences_are_refused_naming_stop(http, path, make, names):
    response = http.post(path, json=body_with(make, names, stop=[f"stop {i}" for i in range(10_000)]))
    refused(response, "POST", path, "stop", "10000")


# -- bodies that are not JSON ------------------------------------------------------------------------------------
JSON_ROUTES = [*ROUTE_IDS, "/question", "/v1/embeddings"]
NOT_JSON = {
    "invalid-utf8": b'{"inputs": "caf\xe9 \xff\xfe", "parameters": {"max_new_tokens": 2}}',
    "truncated": b'{"inputs": "Hello", "parameters": {"max_new_',
    "trailing-garbage": b'{"inputs": "Hello"} and more',
    "empty": b"",
    "nul-bytes": b"\x00" * 64,
}


@pytest.mark.parametrize("body", list(NOT_JSON.values()), ids=list(NOT_JSON))
@pytest.mark.parametrize("path", JSON_ROUTES)
def test_a_body_that_is_not_json_is_refused_naming_json(http, path, body):
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    said = refused(response, "POST", path)
    assert "json" in said.lower() or "body" in said.lower(), said


@pytest.mark.parametrize("body", [body for body in NOT_JSON.values() if body], ids=[name for name, body in NOT_JSON.items() if body])
def test_the_control_api_refuses_a_body_that_is_not_json(http, body):  # an empty one reads as {}, as AWS reads it
    response = http.post("/", content=body, headers=LIST_ENDPOINTS | {"Content-Type": AMZ_JSON})
    refused(response, "POST", "/")


@pytest.mark.parametrize("operation", ["CreateModel", "DescribeEndpoint", "CreateEndpointConfig", "CreateTransformJob"])
@pytest.mark.parametrize("body", ["[]", '"CreateModel"', "NaN", '{"ModelName": NaN}', '{"EndpointName": 1e999}',
                                  '{"ModelName": {"a": [1, 2]}}', '{"\\ud800": 1}'])
def test_the_control_api_refuses_bodies_of_the_wrong_shape(http, operation, body):
    headers = {"X-Amz-Target": f"SageMaker.{operation}", "Content-Type": AMZ_JSON}
    refused(http.post("/", content=body, headers=headers), "POST", "/")


# -- AWS event-stream ---------------------------------------------------------------------------------------------
# The gateway writes event-stream (InvokeEndpointWithResponseStream) and never parses one from a client: event-stream
# bytes sent as a request body are refused by their content type, however broken, and never reach a model.
EVENT = payload_part(json.dumps(lmi()).encode())
EVENT_BODIES = {"whole": EVENT, "truncated": EVENT[:7], "corrupt-crc": EVENT[:-1] + bytes([EVENT[-1] ^ 0xFF]),
                "prelude-only": EVENT[:12], "length-lies": b"\xff\xff\xff\xff" + EVENT[4:]}


@pytest.mark.parametrize("body", list(EVENT_BODIES.values()), ids=list(EVENT_BODIES))
@pytest.mark.parametrize("path", [RUNTIME, RUNTIME_STREAM, "/invocations"])
def test_event_stream_bodies_are_refused_by_content_type(http, path, body):
    response = http.post(path, content=body, headers={"Content-Type": EVENT_STREAM})
    refused(response, "POST", path, EVENT_STREAM)


@pytest.mark.parametrize(("header", "value"), [
    ("Accept", EVENT_STREAM),  # a stream's media type on the whole-answer route
    ("X-Amzn-SageMaker-Accept", EVENT_STREAM),
    ("Accept", "*/*;q=0.1, " + ";" * 500),
    ("X-Amzn-SageMaker-Accept", "application/" + "x" * 2000),
])
@pytest.mark.parametrize("path", [RUNTIME, RUNTIME_STREAM])
def test_odd_accept_headers_get_an_answer_or_a_refusal(http, path, header, value):
    response = http.post(path, json=lmi(), headers={header: value})
    if response.status_code >= 400:
        refused(response, "POST", path)
    elif path == RUNTIME_STREAM:  # a whole, well-formed event-stream that botocore parses
        from botocore.eventstream import EventStreamBuffer

        events = EventStreamBuffer()
        events.add_data(response.content)
        assert [event.headers[":event-type"] for event in events] and response.headers["content-type"] == EVENT_STREAM


# -- SigV4 --------------------------------------------------------------------------------------------------------
def signed(keys, gateway, path: str, body: bytes, headers: dict) -> dict:
    """Headers of a request signed by botocore's own signer with the module's SigV4 key."""
    credentials = Credentials(keys["aws"]["access_key_id"], keys["aws"]["secret_access_key"])
    request = AWSRequest("POST", gateway.base_url + path, data=body, headers=headers)
    SigV4Auth(credentials, "sagemaker", "us-east-1").add_auth(request)
    return dict(request.headers.items())


def spoil_signature(auth: str, change) -> str:
    signature = auth.split("Signature=")[1]
    return auth.replace(signature, change(signature))


# name: (how the Authorization header is spoiled, the refusal's x-amzn-errortype)
SPOILED = {
    "algorithm-only": (lambda auth: "AWS4-HMAC-SHA256", "UnrecognizedClientException"),
    "credential-only": (lambda auth: "AWS4-HMAC-SHA256 Credential=nothing", "UnrecognizedClientException"),
    "truncated": (lambda auth: auth[:-10], "UnrecognizedClientException"),
    "non-hex-signature": (lambda auth: spoil_signature(auth, lambda s: "z" * len(s)), "UnrecognizedClientException"),
    "one-signature-digit-changed": (
        lambda auth: spoil_signature(auth, lambda s: s[:-1] + ("0" if s[-1] != "0" else "1")),
        "InvalidSignatureException",
    ),
    "short-credential-scope": (
        lambda auth: auth.split("/")[0] + "/20260101/us-east-1, SignedHeaders=host, Signature=" + "0" * 64,
        "UnrecognizedClientException",
    ),
    "no-signed-headers": (lambda auth: auth.split(", SignedHeaders")[0] + ", Signature=" + "0" * 64,
                          "UnrecognizedClientException"),
    "signs-a-header-not-sent": (lambda auth: auth.replace("SignedHeaders=", "SignedHeaders=x-not-sent;"),
                                "InvalidSignatureException"),
    "unknown-access-key": (lambda auth: re.sub("Credential=[^/]*/", "Credential=AKIA0000000000000000/", auth),
                           "UnrecognizedClientException"),
    "fields-twice": (lambda auth: auth + ", Credential=x/y/z/w/aws4_request", "UnrecognizedClientException"),
    "commas-only": (lambda auth: "AWS4-HMAC-SHA256 ,,,,,,", "UnrecognizedClientException"),
    "empty-values": (lambda auth: "AWS4-HMAC-SHA256 Credential=, SignedHeaders=, Signature=", "UnrecognizedClientException"),
    "long-credential": (lambda auth: "AWS4-HMAC-SHA256 Credential=" + "a/" * 3000 + ", SignedHeaders=host, Signature=0",
                        "UnrecognizedClientException"),
}
# name: (the signed request's headers changed after signing, the refusal's x-amzn-errortype, what it names)
SPOILED_HEADERS = {
    "date-not-a-date": ({"X-Amz-Date": "yesterday"}, "X-Amz-Date"),
    "no-date": ({"X-Amz-Date": None}, "X-Amz-Date"),
    "payload-hash-not-hex": ({"X-Amz-Content-SHA256": "not hex"}, "X-Amz-Content-SHA256"),
    "payload-hash-of-another-body": ({"X-Amz-Content-SHA256": "0" * 64}, "X-Amz-Content-SHA256"),
    "date-not-the-scope-s": ({"X-Amz-Date": "29991231T000000Z"}, "date"),
}


@pytest.mark.parametrize("spoil", list(SPOILED.values()), ids=list(SPOILED))
@pytest.mark.parametrize(("path", "headers", "body"), [
    (RUNTIME, {"Content-Type": "application/json"}, json.dumps(lmi()).encode()),
    ("/", LIST_ENDPOINTS, b"{}"),
], ids=["runtime", "control"])
def test_a_malformed_sigv4_authorization_is_refused_with_aws_s_codes(gateway, keys, spoil, path, headers, body):
    how, code = spoil
    sent = signed(keys, gateway, path, body, headers)
    sent["Authorization"] = how(sent["Authorization"])
    response = httpx.post(gateway.base_url + path, content=body, headers=sent, timeout=TIMEOUT)
    refused(response, "POST", path, status=403)
    assert response.headers["x-amzn-errortype"] == code, response.text


@pytest.mark.parametrize(("changes", "names"), list(SPOILED_HEADERS.values()), ids=list(SPOILED_HEADERS))
def test_signed_headers_changed_after_signing_are_refused_naming_them(gateway, keys, changes, names):
    body = json.dumps(lmi()).encode()
    sent = signed(keys, gateway, RUNTIME, body, {"Content-Type": "application/json"})
    for name, value in changes.items():
        sent.pop(name, None)
        if value is not None:
            sent[name] = value
    response = httpx.post(gateway.base_url + RUNTIME, content=body, headers=sent, timeout=TIMEOUT)
    refused(response, "POST", RUNTIME, names, status=403)
    assert response.headers["x-amzn-errortype"] == "InvalidSignatureException"


def test_a_correctly_signed_request_still_passes(gateway, keys):
    """The control for the cases above: the same request, unspoiled, is served."""
    body = json.dumps(lmi()).encode()
    sent = signed(keys, gateway, RUNTIME, body, {"Content-Type": "application/json"})
    assert httpx.post(gateway.base_url + RUNTIME, content=body, headers=sent, timeout=TIMEOUT).status_code == 200


# -- WebSocket frames -----------------------------------------------------------------------------------------
class RawWebSocket:
    """A WebSocket client that can send bytes no library would: websockets' sans-I/O protocol does the handshake
    and parses what the gateway sends; the test writes whatever it likes to the socket itself."""

    def __init__(self, gateway, keys):
        self.protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{gateway.port}/ws"))
        self.socket = socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT)
        request = self.protocol.connect()
        request.headers["Authorization"] = f"Bearer {keys['bearer']}"
        self.protocol.send_request(request)
        self.flush()
        self.pending: list = []
        assert self.next_text()["type"] == "welcome"

    def flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.socket.sendall(data)

    def events(self):
        """Text and close frames from the gateway, once it sends one or closes (pings are answered, the handshake's
        response consumed); within TIMEOUT, as the gateway's keep-alive pings would keep a bare read waiting on."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            received = self.protocol.events_received()
            if frames := [event for event in received if getattr(event, "opcode", None) in (Opcode.TEXT, Opcode.CLOSE)]:
                return frames
            data = self.socket.recv(65536)
            if not data:
                self.protocol.receive_eof()
                return []
            self.protocol.receive_data(data)
            self.flush()  # answers pings and echoes a close, as a client must
        raise AssertionError(f"nothing from the gateway in {TIMEOUT} s")

    def next_frame(self):
        if not self.pending:
            self.pending = self.events()
        return self.pending.pop(0) if self.pending else None

    def next_text(self) -> dict:
        frame = self.next_frame()
        assert frame is not None and frame.opcode == Opcode.TEXT, frame
        return json.loads(frame.data)

    def close_code(self) -> int | None:
        """The code of the gateway's close frame, once it closes (None: it hung up without one)."""
        while (frame := self.next_frame()) is not None:
            if frame.opcode == Opcode.CLOSE:
                return Close.parse(frame.data).code
        return None

    def send_raw(self, data: bytes) -> None:
        self.socket.sendall(data)

    def send_text(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        self.flush()

    def close(self) -> None:
        self.socket.close()


def frame(opcode: int, payload: bytes, *, masked: bool = True, first_byte_bits: int = 0x80,
          length: int | None = None) -> bytes:
    """One client frame written by hand, so that it can break RFC 6455 on purpose."""
    size = len(payload) if length is None else length
    head = bytes([first_byte_bits | opcode])
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 1 << 16:
        head += bytes([mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = b"\x13\x37\xbe\xef"
    return head + key + bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))


REQUEST = json.dumps({"id": 1, "inputs": "Hello", "parameters": {"max_new_tokens": 2}}).encode()
PROTOCOL_ERROR, INVALID_DATA, TOO_BIG = 1002, 1007, 1009
BROKEN_FRAMES = {
    "not-a-frame": (b"\x00\xff\x13 this is not a WebSocket frame\r\n", TOO_BIG),  # read as a huge length
    "unmasked": (frame(Opcode.TEXT, REQUEST, masked=False), PROTOCOL_ERROR),
    "reserved-opcode": (frame(0x3, REQUEST), PROTOCOL_ERROR),
    "reserved-bits": (frame(Opcode.TEXT, REQUEST, first_byte_bits=0x80 | 0x40), PROTOCOL_ERROR),
    "length-2^62": (frame(Opcode.TEXT, b"", length=1 << 62), TOO_BIG),
    "control-frame-too-long": (frame(Opcode.PING, b"x" * 200), PROTOCOL_ERROR),
    "continuation-of-nothing": (frame(Opcode.CONT, b"x"), PROTOCOL_ERROR),
    "close-with-invalid-code": (frame(Opcode.CLOSE, (999).to_bytes(2, "big") + b"x"), PROTOCOL_ERROR),
    "text-not-utf8": (frame(Opcode.TEXT, b'{"inputs": "caf\xe9 \xff\xfe"}'), INVALID_DATA),
}


@pytest.mark.parametrize(("data", "code"), list(BROKEN_FRAMES.values()), ids=list(BROKEN_FRAMES))
def test_a_broken_websocket_frame_closes_that_connection_with_its_code(gateway, keys, data, code):
    ws = RawWebSocket(gateway, keys)
    try:
        ws.send_raw(data)
        assert ws.close_code() == code
    finally:
        ws.close()


def test_a_truncated_frame_then_a_hang_up_leaves_the_gateway_serving(gateway, keys):
    ws = RawWebSocket(gateway, keys)
    ws.send_raw(frame(Opcode.TEXT, REQUEST)[:9])
    ws.close()
    fresh = RawWebSocket(gateway, keys)  # the per-client connection count was given back
    fresh.close()


BAD_MESSAGES = {
    "binary": (frame(Opcode.BINARY, REQUEST), "not a binary one"),
    "truncated-json": (frame(Opcode.TEXT, b'{"id": 1, "inputs": '), "not valid JSON"),
    "nan-temperature": (frame(Opcode.TEXT, b'{"id": 1, "inputs": "Hello", "parameters": {"temperature": NaN}}'),
                        "temperature: Input should be a finite number"),
    "huge-max-new-tokens": (
        frame(Opcode.TEXT, b'{"id": 1, "inputs": "Hello", "parameters": {"max_new_tokens": 1000000000000}}'),
        "SERVELET_MAX_TOKENS_PER_REQUEST",
    ),
    "100k-brackets": (frame(Opcode.TEXT, b"[" * 100_000), "deeper than"),
    "lone-surrogate-string": (frame(Opcode.TEXT, b'"\\ud800"'), "JSON object"),
}


@pytest.mark.parametrize(("data", "says"), list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
def test_a_bad_message_gets_an_error_frame_and_the_connection_serves_on(gateway, keys, data, says):
    ws = RawWebSocket(gateway, keys)
    try:
        ws.send_raw(data)
        error = ws.next_text()
        assert error["type"] == "error" and says.lower() in error["message"].lower(), error
        ws.send_text(json.dumps({"id": 2, "inputs": "Hello", "parameters": {"max_new_tokens": 1}}))
        while (answer := ws.next_text())["type"] == "token":
            pass
        assert answer["type"] == "answer" and answer["id"] == 2, answer
    finally:
        ws.close()


# -- a 100 MB body ---------------------------------------------------------------------------------------------
def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def hundred_megabytes():
    """100 MB of JSON-looking bytes, a megabyte at a time: the client never holds them either."""
    yield b'{"inputs": "'
    for _ in range(100):
        yield b"a" * (1024 * 1024)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", [RUNTIME, "/generate", "/v1/completions", "/question", "/"])
def test_a_100_mb_body_is_refused_without_the_gateway_holding_it(gateway, http, path, declared):
    before = peak_rss_kib(gateway.process.pid)
    headers = {"Content-Type": "application/json"}
    if declared:
        headers["Content-Length"] = str(100 * 1024 * 1024 + len(b'{"inputs": "'))
    try:
        response = http.post(path, content=hundred_megabytes(), headers=headers)
    except httpx.WriteError:
        return  # the gateway answered and closed before the client finished writing: refused all the same
    refused(response, "POST", path, str(PAYLOAD), "SERVELET_MAX_PAYLOAD_BYTES",
            status=400 if path == RUNTIME else 413)  # SageMaker refuses with ValidationError, as AWS does
    grown_mib = (peak_rss_kib(gateway.process.pid) - before) / 1024
    assert grown_mib < 50, f"the gateway's peak memory grew by {grown_mib:.0f} MiB"


# -- routing: no such route, not its method ----------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "status"), [
    ("PUT", "/v1/models", 405), ("DELETE", "/generate", 405), ("GET", "/endpoints/default/invocations", 400),
    ("PATCH", "/", 405), ("GET", "/no/such/route", 404), ("GET", "/v1/no-such-route", 404),
])
def test_a_wrong_method_or_path_is_refused_in_the_path_s_family_shape(http, method, path, status):
    response = http.request(method, path)
    refused(response, method, path, status=status)


def test_plain_http_to_the_websocket_route_is_told_to_upgrade(http):
    response = http.get("/ws")
    refused(response, "GET", "/ws", "WebSocket", status=426)
    assert response.headers["Upgrade"] == "websocket"
