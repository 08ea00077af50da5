"""AWS Signature Version 4 checked with botocore's own signer, so a boto3 client works unchanged.

The request is rebuilt as botocore's `AWSRequest` from what arrived (method, path and query as sent, the headers
the client signed, the body) and signed again with the stored secret, for the service and region of the
credential scope the client used (botocore signs sagemaker-runtime and the control API as `sagemaker`,
autoscaling as `application-autoscaling`). The two signatures are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from starlette.datastructures import Headers

from .errors import BadSignature, Unauthenticated

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_S = 300  # AWS refuses a request signed more than 5 minutes from its clock
TIMESTAMP = "%Y%m%dT%H%M%SZ"
AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<key>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/,\s]+)/(?P<service>[^/,\s]+)"
    r"/aws4_request\s*,\s*SignedHeaders=(?P<signed>[a-z0-9;._-]+)\s*,\s*Signature=(?P<signature>[0-9a-f]{64})\s*$"
)
REQUIRED_SIGNED = ("host", "x-amz-date")


@dataclass(frozen=True)
class Signed:
    """What the Authorization header says: who signed, for which scope, which headers, and the signature."""

    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def is_sigv4(authorization: str | None) -> bool:
    return bool(authorization) and authorization.startswith(ALGORITHM)


def parse_authorization(authorization: str) -> Signed:
    match = AUTHORIZATION.match(authorization)
    if match is None:
        raise Unauthenticated("the Authorization header is not a well-formed AWS4-HMAC-SHA256 signature")
    return Signed(match["key"], match["date"], match["region"], match["service"], tuple(match["signed"].split(";")),
                  match["signature"])


def verify(signed: Signed, secret: str, method: str, url: str, headers: Headers, body: bytes,
           now: datetime | None = None) -> None:
    """Raise BadSignature unless the request is the one the holder of `secret` signed, within the clock skew."""
    missing = [name for name in REQUIRED_SIGNED if name not in signed.signed_headers]
    if missing:
        raise BadSignature(f"the signature must cover the headers {', '.join(missing)}")
    amz_date = headers.get("x-amz-date", "")
    _check_date(amz_date, signed.date, now or datetime.now(timezone.utc))
    declared = headers.get("x-amz-content-sha256")
    if declared is not None and declared != hashlib.sha256(body).hexdigest():
        raise BadSignature("X-Amz-Content-SHA256 does not match the body received (an unsigned payload is refused)")
    request = AWSRequest(method=method, url=url, data=body)
    for name in signed.signed_headers:
        values = headers.getlist(name)
        if not values:
            raise BadSignature(f"the signed header {name} is not in the request")
        for value in values:
            request.headers[name] = value  # HTTPHeaders appends: repeated headers stay repeated, as signed
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(signed.access_key_id, secret), signed.service, signed.region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, signed.signature):
        raise BadSignature(
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret "
            "Access Key and signing method."
        )


def _check_date(amz_date: str, scope_date: str, now: datetime) -> None:
    try:
        signed_at = datetime.strptime(amz_date, TIMESTAMP).replace(tzinfo=timezone.utc)
    except ValueError:
        raise BadSignature("X-Amz-Date is missing or not of the form YYYYMMDDTHHMMSSZ") from None
    if amz_date[:8] != scope_date:
        raise BadSignature("the credential scope's date is not X-Amz-Date's")
    skew = abs((now - signed_at).total_seconds())
    if skew > MAX_SKEW_S:
        # AWS's words, which botocore users search for.
        raise BadSignature(
            f"Signature expired: {amz_date} is now earlier than {now.strftime(TIMESTAMP)} minus 5 minutes"
            if signed_at < now else
            f"Signature not yet current: {amz_date} is still later than {now.strftime(TIMESTAMP)} plus 5 minutes"
        )
