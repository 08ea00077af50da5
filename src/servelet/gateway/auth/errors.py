"""Refusals of the auth and browser checks, each written in its route family's error shape.

The AWS families get the codes botocore raises for AWS itself (`UnrecognizedClientException`,
`InvalidSignatureException`, `AccessDeniedException`, all 403), in `x-amzn-errortype` (rest-json: the runtime)
and `__type` (JSON 1.1: the control APIs) at once; the others get 401 or 403 in their own shape.
"""

from __future__ import annotations

import uuid

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from ...errors import GatewayError
from ..api.sagemaker import render_sagemaker_error
from ..errors import render
from .rules import Family


class Unauthenticated(GatewayError):
    """No credentials, or credentials no key in the store has."""

    status, kind = 401, "unauthorized"
    aws_code = "UnrecognizedClientException"


class NoCredentials(Unauthenticated):
    aws_code = "MissingAuthenticationTokenException"


class BadSignature(Unauthenticated):
    """A SigV4 request whose signature, signed headers, payload hash or date does not hold."""

    aws_code = "InvalidSignatureException"


class Forbidden(GatewayError):
    """A known key whose scopes do not reach the route or the endpoint."""

    status, kind = 403, "forbidden"
    aws_code = "AccessDeniedException"


AWS_STATUS = 403


def render_refusal(request: Request, family: Family, error: GatewayError) -> Response:
    aws_code = getattr(error, "aws_code", None)
    if family in ("sagemaker", "aws-json") and aws_code:
        return _aws_error(aws_code, error.message, AWS_STATUS)
    if family == "aws-json":
        return _aws_error("ValidationException", error.message, error.status)
    if family == "sagemaker":
        return render_sagemaker_error(error)
    request.state.api_family = family
    response = render(request, error)
    if isinstance(error, Unauthenticated):
        response.headers["WWW-Authenticate"] = 'Bearer realm="servelet"'
    return response


def _aws_error(code: str, message: str, status: int) -> Response:
    """Both AWS error shapes in one answer: botocore's rest-json parser reads the header, its JSON one `__type`."""
    body = {"__type": code, "message": message, "Message": message}
    headers = {"x-amzn-errortype": code, "x-amzn-RequestId": str(uuid.uuid4())}
    return JSONResponse(body, status_code=status, headers=headers)
