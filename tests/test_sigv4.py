"""The SigV4 check on its own: requests signed by botocore pass, and each thing a signature must cover is checked."""

from __future__ import annotations

from datetime import datetime, timezone
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from starlette.datastructures import Headers

from servelet.gateway.auth import sigv4
from servelet.gateway.auth.errors import BadSignature, Unauthenticated

KEY_ID, SECRET = "SVLTTESTTESTTESTTEST", "s3cr3t" * 6
URL = "http://127.0.0.1:8080/endpoints/my-endpoint/invocations"
NOW = datetime(2026, 12, 7, 12, 0, 0, tzinfo=timezone.utc)


def signed(body: bytes = b'{"inputs": "hi"}', service: str = "sagemaker", **headers: str) -> AWSRequest:
    request = AWSRequest(method="POST", url=URL, data=body, headers={"Content-Type": "application/json", **headers})
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        SigV4Auth(Credentials(KEY_ID, SECRET), service, "eu-west-1").add_auth(request)
    return request


def check(request: AWSRequest, body: bytes | None = None, secret: str = SECRET, **changed: str) -> None:
    headers = {k.lower(): v for k, v in request.headers.items()} | {"host": "127.0.0.1:8080"} | changed
    parsed = sigv4.parse_authorization(headers["authorization"])
    sigv4.verify(parsed, secret, "POST", URL, Headers(headers), request.body if body is None else body, now=NOW)


def test_botocore_signed_requests_pass_for_the_service_and_region_they_name():
    check(signed())
    check(signed(service="application-autoscaling"))
    assert sigv4.parse_authorization(signed().headers["Authorization"]).region == "eu-west-1"


def test_a_wrong_secret_a_changed_body_or_a_changed_signed_header_fail():
    with pytest.raises(BadSignature, match="does not match"):
        check(signed(), secret="wrong")
    with pytest.raises(BadSignature, match="does not match"):
        check(signed(), body=b'{"inputs": "bye"}')
    with pytest.raises(BadSignature, match="does not match"):
        check(signed(), **{"content-type": "text/csv"})


def test_the_payload_hash_header_must_be_the_body_s():
    request = signed(**{"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    with pytest.raises(BadSignature, match="X-Amz-Content-SHA256"):
        check(request)


def test_host_and_date_must_be_signed_and_the_date_current():
    request = signed()
    unsigned_host = request.headers["Authorization"].replace("SignedHeaders=content-type;host;x-amz-date",
                                                             "SignedHeaders=content-type;x-amz-date")
    with pytest.raises(BadSignature, match="host"):
        check(request, authorization=unsigned_host)
    with pytest.raises(BadSignature, match="Signature expired"):
        sigv4.verify(sigv4.parse_authorization(request.headers["Authorization"]), SECRET, "POST", URL,
                     Headers({k.lower(): v for k, v in request.headers.items()} | {"host": "127.0.0.1:8080"}),
                     request.body, now=NOW.replace(minute=6))


def test_a_malformed_authorization_header_is_refused():
    with pytest.raises(Unauthenticated, match="well-formed"):
        sigv4.parse_authorization("AWS4-HMAC-SHA256 Credential=nothing")
