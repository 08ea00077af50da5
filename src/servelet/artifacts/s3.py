"""`s3://BUCKET/KEY` through boto3. Endpoint, credentials and region come from the usual AWS settings
(AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID, ...); the region defaults to us-east-1,
and a machine without credentials reads public buckets unsigned."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from functools import lru_cache

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError, ResponseStreamingError
from botocore.exceptions import ConnectionError as S3ConnectionError

from .errors import ArtifactError, ArtifactMissing
from .remote import CHUNK_BYTES, RemoteObject

DEFAULT_REGION = "us-east-1"
# The settings a client is built from: a change in any of them gets a new client.
CLIENT_SETTINGS = (
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
)


class S3Object(RemoteObject):
    # Worth another try: a broken stream, or any connection or HTTP-level failure (timeouts, resets, proxies).
    transient = (ResponseStreamingError, IncompleteReadError, S3ConnectionError, HTTPClientError)
    ranges = True

    def __init__(self, uri: str, concurrency: int):
        self.uri = uri
        self.bucket, _, self.key = uri.removeprefix("s3://").partition("/")
        if not self.bucket or not self.key or self.key.endswith("/"):
            raise ArtifactError(f"{uri}: an s3:// model URI names one object: s3://BUCKET/KEY")
        self.name = self.key.rsplit("/", 1)[-1]
        try:
            self.client = client_for(concurrency, tuple(os.environ.get(name) for name in CLIENT_SETTINGS))
        except (BotoCoreError, ValueError) as exc:  # a missing profile, an endpoint URL that is no URL, ...
            raise ArtifactError(f"{uri}: the AWS settings do not make an S3 client: {exc}") from None
        head = self._head()
        self.size = head["ContentLength"]
        self.etag = head["ETag"]
        checksum = head.get("ChecksumSHA256")
        # A multipart upload's checksum is of its parts ("...-N"), not of the object: only a whole-object one is kept.
        if checksum and "-" not in checksum and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            self.stored_sha256 = base64.b64decode(checksum).hex()
        self.version = f"{self.etag} {checksum or ''}"

    def read(self, start: int, end: int | None) -> Iterator[bytes]:
        last = self.size - 1 if end is None else end - 1
        try:
            # IfMatch: every part comes from the same version of the object, or the fetch fails.
            response = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{last}", IfMatch=self.etag)
        except ClientError as exc:
            if http_status(exc) == 412:
                raise ArtifactError(f"{self.uri}: the object changed while it was being fetched; deploy again") from None
            raise ArtifactError(self._explain(exc)) from None
        yield from response["Body"].iter_chunks(CHUNK_BYTES)

    def _head(self) -> dict:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key, ChecksumMode="ENABLED")
        except ClientError as exc:
            raise (ArtifactMissing if http_status(exc) == 404 else ArtifactError)(self._explain(exc)) from None
        except BotoCoreError as exc:
            raise ArtifactError(f"{self.uri}: cannot reach S3 at {self.client.meta.endpoint_url}: {exc}") from None

    def _explain(self, exc: ClientError) -> str:
        """What a failed call means, in words (a HEAD's 404 says neither whether the bucket or the key is missing)."""
        status, code = http_status(exc), exc.response.get("Error", {}).get("Code", "")
        where = f"(S3 endpoint {self.client.meta.endpoint_url})"
        if status == 404:
            if not self._bucket_exists():
                return f"{self.uri}: the bucket {self.bucket!r} does not exist {where}"
            return f"{self.uri}: there is no object {self.key!r} in the bucket {self.bucket!r} {where}"
        if status == 403:
            return f"{self.uri}: access denied: check the AWS credentials and the bucket's policy {where}"
        message = exc.response.get("Error", {}).get("Message", "")
        return f"{self.uri}: S3 answered {status} {code}: {message} {where}"

    def _bucket_exists(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except ClientError as exc:
            return http_status(exc) != 404


@lru_cache(maxsize=4)
def client_for(concurrency: int, settings: tuple[str | None, ...]):
    """One client per process and settings (they are thread-safe): building one reads botocore's models, ~0.2 s."""
    session = boto3.session.Session()
    config = Config(max_pool_connections=max(10, concurrency), retries={"mode": "standard", "max_attempts": 5})
    if session.get_credentials() is None:
        config = config.merge(Config(signature_version=UNSIGNED))
    return session.client("s3", region_name=session.region_name or DEFAULT_REGION, config=config)


def http_status(exc: ClientError) -> int:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
