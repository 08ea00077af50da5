"""Each API family's error shape, as that family's client reads it: the fuzz run and the bad-input tests judge every
refusal by it (a refusal a client cannot parse is as bad as a wrong one)."""

from __future__ import annotations

import json

from botocore.parsers import create_parser


def family(method: str, path: str, headers) -> str:
    """Which API family answers a request: the split the gateway's auth rules make (gateway/auth/rules.py)."""
    if path == "/" and method.upper() == "POST":
        return "aws-json" if any(name.lower() == "x-amz-target" for name in headers) else "tgi"
    if path.startswith(("/endpoints/", "/async-invocations/")) or path == "/invocations":
        return "sagemaker"
    if path.startswith("/v1/"):
        return "openai"
    if path in ("/generate", "/generate_stream", "/info"):
        return "tgi"
    return "plain"


def _text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


# The AWS families' wire protocols, as botocore names them: the SageMaker runtime is rest-json (the code in
# x-amzn-errortype), the control APIs on `POST /` JSON 1.1 (the code in `__type`).
BOTOCORE_PROTOCOL = {"sagemaker": "rest-json", "aws-json": "json"}


def aws_error(family_name: str, content: bytes, headers) -> dict:
    """{"Code", "Message"} as botocore parses an error answer of an AWS family (what boto3 raises)."""
    response = {"status_code": 400, "headers": dict(headers), "body": content}
    return create_parser(BOTOCORE_PROTOCOL[family_name]).parse(response, None)["Error"]


def message(family_name: str, content: bytes, headers) -> str:
    """The error message a client of the family shows (what the bad-input tests read the problem's name from)."""
    if family_name in BOTOCORE_PROTOCOL:
        return aws_error(family_name, content, headers)["Message"]
    body = json.loads(content)
    if family_name == "openai":
        return body["error"]["message"]
    return body["error"]


def problem(family_name: str, content: bytes, headers) -> str | None:
    """What keeps the family's client from reading an error answer (None: it reads a code and a message).
    `headers` has lower-case names."""
    try:
        body = json.loads(content)
    except ValueError:
        return "the body is not JSON"
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    if family_name in BOTOCORE_PROTOCOL:  # read by botocore's own parser, which falls back to the status as the code
        error = aws_error(family_name, content, headers)
        ok = _text(error.get("Code")) and not error["Code"].isdigit() and _text(error.get("Message"))
        return None if ok else f"botocore reads no error code and message: {error}"
    if family_name == "openai":  # the openai client's APIStatusError: error.message, error.type
        error = body.get("error")
        ok = isinstance(error, dict) and _text(error.get("message")) and _text(error.get("type"))
        return None if ok else 'no {"error": {"message", "type"}}'
    if family_name == "tgi":  # huggingface_hub: `error` and `error_type`
        ok = _text(body.get("error")) and _text(body.get("error_type"))
        return None if ok else 'no "error" and "error_type"'
    ok = _text(body.get("error")) and _text(body.get("error_type")) and isinstance(body.get("code"), int)
    return None if ok else 'no "code", "error_type" and "error"'
