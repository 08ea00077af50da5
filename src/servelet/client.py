"""A small client of a running gateway: its SageMaker control API and runtime API, over httpx.

The CLI talks to the gateway through this, as any other client would, so it never imports the model or the store:
what the CLI shows is what the server says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"  # `servelet serve`'s address; the CLI reads --url / SERVELET_URL
AMZ_JSON = "application/x-amz-json-1.1"
API_KEY_VARIABLE = "SERVELET_API_KEY"  # the key a gateway run with --auth wants (`servelet keys create`)


class ServeletError(Exception):
    """An answer the user should read: the server's error code (when it gave one) and its message."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code


class GatewayUnreachable(ServeletError):
    """Nothing answers at the URL: the gateway is not running there."""


@dataclass
class Answer:
    body: bytes
    content_type: str
    variant: str | None


class Client:
    def __init__(self, url: str = DEFAULT_URL, timeout: float = 300.0, api_key: str | None = None):
        self.url = url.rstrip("/")
        api_key = api_key or os.environ.get(API_KEY_VARIABLE)
        # Generations can take a while; connecting must not, so a stopped gateway is reported at once.
        self.http = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(timeout, connect=5.0), headers={"x-api-key": api_key} if api_key else {}
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # -- the control API (what boto3's `sagemaker` client sends) ------------------------------------------
    def control(self, operation: str, _service: str = "SageMaker", **body) -> dict:
        """Run one SageMaker control operation; its error comes back as ServeletError(message, code)."""
        response = self._send(
            "POST", "/", content=json.dumps(body),
            headers={"X-Amz-Target": f"{_service}.{operation}", "Content-Type": AMZ_JSON},
        )
        data = _json(response)
        if response.is_success:
            return data if isinstance(data, dict) else {}
        code = str(data.get("__type", "")).rsplit("#", 1)[-1] if isinstance(data, dict) else ""
        message = (data.get("message") or data.get("Message")) if isinstance(data, dict) else None
        raise ServeletError(message or _text(response), code or None)

    def autoscaling(self, operation: str, **body) -> dict:
        """Run one Application Auto Scaling operation (what boto3's `application-autoscaling` client sends)."""
        return self.control(operation, _service="AnyScaleFrontendService", ServiceNamespace="sagemaker", **body)

    def describe_endpoint(self, name: str) -> dict | None:
        """DescribeEndpoint, or None where the endpoint does not exist."""
        return self._described("DescribeEndpoint", EndpointName=name)

    def describe_model(self, name: str) -> dict | None:
        """DescribeModel, or None where there is no model of that name."""
        return self._described("DescribeModel", ModelName=name)

    def describe_transform_job(self, name: str) -> dict:
        """DescribeTransformJob's raw JSON: it carries servelet's `Progress` (RecordsDone, RecordsFailed, FilesDone,
        FilesTotal, RecordFailures), which botocore would drop."""
        return self.control("DescribeTransformJob", TransformJobName=name)

    def _described(self, operation: str, **body) -> dict | None:
        """A Describe* answer, or None where SageMaker says it could not find the resource."""
        try:
            return self.control(operation, **body)
        except ServeletError as exc:
            if exc.code == "ValidationException" and "Could not find" in exc.message:
                return None
            raise

    def list_all(self, operation: str, key: str, **body) -> list[dict]:
        """Every page of a List* operation."""
        items, token = [], None
        while True:
            page = self.control(operation, MaxResults=100, **body, **({"NextToken": token} if token else {}))
            items += page.get(key, [])
            token = page.get("NextToken")
            if not token:
                return items

    # -- the runtime API (what boto3's `sagemaker-runtime` client sends) --------------------------------------
    def invoke(self, endpoint: str, body: bytes, content_type: str = "application/json") -> Answer:
        response = self._send(
            "POST", f"/endpoints/{endpoint}/invocations", content=body, headers={"Content-Type": content_type}
        )
        if not response.is_success:
            raise _runtime_error(response)
        return Answer(response.content, response.headers.get("content-type", ""), _variant(response))

    def invoke_stream(self, endpoint: str, body: bytes, content_type: str = "application/json") -> Iterator[bytes]:
        """Each JSON line of a streamed answer (`"stream": true` in an LMI body) as the gateway passes it on."""
        path = f"/endpoints/{endpoint}/invocations"
        try:
            with self.http.stream("POST", path, content=body, headers={"Content-Type": content_type}) as response:
                if not response.is_success:
                    response.read()
                    raise _runtime_error(response)
                for line in response.iter_lines():
                    if line.strip():
                        _raise_if_error_line(line)
                        yield line.encode()
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def invoke_async(self, endpoint: str, body: bytes | None = None, input_location: str | None = None,
                     content_type: str = "application/json", inference_id: str | None = None,
                     ttl_seconds: int | None = None, invocation_timeout_seconds: int | None = None) -> dict:
        """InvokeEndpointAsync as botocore sends it: the input at `input_location`, or `body` itself (≤ 128,000
        bytes). The 202's JSON: InferenceId, OutputLocation, and FailureLocation when the endpoint has one."""
        headers = {"X-Amzn-SageMaker-Content-Type": content_type, "Content-Type": content_type}
        optional = {
            "X-Amzn-SageMaker-InputLocation": input_location, "X-Amzn-SageMaker-Inference-Id": inference_id,
            "X-Amzn-SageMaker-RequestTTLSeconds": ttl_seconds,
            "X-Amzn-SageMaker-InvocationTimeoutSeconds": invocation_timeout_seconds,
        }
        headers |= {name: str(value) for name, value in optional.items() if value is not None}
        response = self._send("POST", f"/endpoints/{endpoint}/async-invocations", content=body or b"", headers=headers)
        return _runtime_json(response)

    def async_status(self, inference_id: str) -> dict:
        """Where an async invocation stands (GET /async-invocations/{id}): Status, Attempts, OutputLocation, ..."""
        return _runtime_json(self._send("GET", f"/async-invocations/{quote(inference_id, safe='')}"))

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: httpx.TransportError) -> ServeletError:
        if isinstance(exc, httpx.ConnectError):
            return GatewayUnreachable(f"gateway not running at {self.url} (start it with `servelet serve`, or set --url)")
        if isinstance(exc, httpx.TimeoutException):
            return ServeletError(f"the gateway at {self.url} did not answer in time ({type(exc).__name__})")
        return ServeletError(f"the connection to {self.url} failed: {exc or type(exc).__name__}")


def _json(response: httpx.Response):
    return _loads(response.content)


def _loads(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _text(response: httpx.Response) -> str:
    return response.text.strip() or f"the gateway answered HTTP {response.status_code}"


def _variant(response: httpx.Response) -> str | None:
    return response.headers.get("x-amzn-invoked-production-variant")


def _runtime_error(response: httpx.Response) -> ServeletError:
    """The runtime API's error: the code in `x-amzn-errortype`, the model's own message for a ModelError."""
    data = _json(response)
    code = response.headers.get("x-amzn-errortype", "").split(":", 1)[0] or None
    if isinstance(data, dict):
        message = data.get("OriginalMessage") or data.get("Message") or data.get("message") or data.get("error")
        if message:
            return ServeletError(str(message), code)
    return ServeletError(_text(response), code)


def _runtime_json(response: httpx.Response) -> dict:
    """A runtime answer's JSON object, or its error as ServeletError."""
    if not response.is_success:
        raise _runtime_error(response)
    data = _json(response)
    if not isinstance(data, dict):
        raise ServeletError(f"the gateway answered HTTP {response.status_code} without a JSON object: {_text(response)[:200]}")
    return data


def _raise_if_error_line(line: str) -> None:
    """An instance that fails mid-stream ends it with `{"error": ...}` (the HTTP status was already sent)."""
    if '"error"' not in line:
        return
    data = _loads(line.encode())
    if isinstance(data, dict) and "error" in data and "token" not in data:
        raise ServeletError(str(data["error"]), data.get("error_type"))
