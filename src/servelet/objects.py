"""Where async-inference payloads live: `s3://BUCKET/KEY` and `file:///abs/path` (or a plain absolute path).

Payloads may be up to 1 GB, so bytes are streamed one chunk at a time, never held whole. The blocking calls (boto3,
file I/O) run in threads with `asyncio.to_thread`, one chunk per call, so the gateway's event loop keeps serving.
A write is atomic: a reader sees the old object, or no object, until the new one is complete.

With auth on, the gateway confines file:// URIs to the folders SERVELET_FILE_ROOTS names (`confine_files`): a key
that may invoke an endpoint must not make the server read or overwrite its own files.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from .artifacts.s3 import CLIENT_SETTINGS, client_for, http_status

CHUNK_BYTES = 1 << 20
# S3 takes up to 5 GB in one PUT, but a multipart upload sends a large payload without holding it whole.
PART_BYTES = 8 << 20
S3_POOL_CONNECTIONS = 10
log = logging.getLogger(__name__)
ACCEPTED_FORMS = "s3://BUCKET/KEY, file:///ABSOLUTE/PATH or /ABSOLUTE/PATH"


class ObjectStoreError(Exception):
    """The URI names nothing we can read or write (bad URI, missing object or bucket, access denied): the caller's to fix."""


class ObjectMissing(ObjectStoreError):
    """No object at the URI."""


class Reader(Protocol):
    def read(self, size: int) -> bytes: ...
    def close(self) -> None: ...


class Writer(Protocol):
    """Takes the chunks of one object; nothing is visible at its URI until `commit`, and nothing at all after `abort`."""

    def write(self, chunk: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


# --- URIs -------------------------------------------------------------------------------------------------------

_file_roots: tuple[Path, ...] | None = None  # None: anywhere the server's user may read and write


def confine_files(roots: list[Path] | None) -> None:
    """From now on, file:// URIs in this process must be in one of `roots` (None: anywhere)."""
    global _file_roots
    _file_roots = None if roots is None else tuple(Path(os.path.realpath(root)) for root in roots)


def check_confined(uri: str, path: str) -> None:
    """Refuse a file path outside the roots, after resolving `..` and symbolic links."""
    if _file_roots is None:
        return
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(root) for root in _file_roots):
        allowed = ", ".join(str(root) for root in _file_roots) or "none set"
        raise ObjectStoreError(
            f"{uri!r}: with auth on, file:// paths must be inside a folder of SERVELET_FILE_ROOTS ({allowed})"
        )



@dataclass(frozen=True)
class FileLocation:
    uri: str
    path: Path


@dataclass(frozen=True)
class S3Location:
    uri: str
    bucket: str
    key: str


Location = FileLocation | S3Location


def parse(uri: str) -> Location:
    """Where `uri` points; an ObjectStoreError says what is wrong with it and which forms are accepted."""
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not bucket or not key or key.endswith("/"):
            raise _bad_uri(uri, "an s3:// URI names one object, a bucket and a key")
        return S3Location(uri, bucket, key)
    path = uri.removeprefix("file://")
    if "://" in path:
        raise _bad_uri(uri, "unsupported scheme")
    if not path.startswith("/"):
        raise _bad_uri(uri, "a file path must be absolute")
    if path.endswith("/"):
        raise _bad_uri(uri, "a file URI names a file, not a directory")
    check_confined(uri, path)
    return FileLocation(uri, Path(path))


def join(prefix: str, name: str) -> str:
    """The URI of `name` under `prefix` ("s3://b/out" + "id.out" -> "s3://b/out/id.out"), in the prefix's own form."""
    if not name or name.startswith("/"):
        raise ObjectStoreError(f"{name!r}: a name under {prefix!r} must be relative and not empty")
    uri = prefix + name if prefix.endswith("/") else f"{prefix}/{name}"
    parse(uri)
    return uri


def _bad_uri(uri: str, problem: str) -> ObjectStoreError:
    return ObjectStoreError(f"{uri!r}: {problem}; an object URI is {ACCEPTED_FORMS}")


# --- the async API ----------------------------------------------------------------------------------------------


async def size(uri: str) -> int:
    """The object's size in bytes; ObjectMissing if there is none."""
    location = parse(uri)
    return await asyncio.to_thread(_size_of, location)


async def exists(uri: str) -> bool:
    location = parse(uri)
    try:
        await asyncio.to_thread(_size_of, location)
        return True
    except ObjectMissing:
        return False


async def delete(uri: str) -> None:
    """Remove the object; one already gone is no error."""
    location = parse(uri)
    await asyncio.to_thread(_delete, location)


async def remove_unfinished_writes(uri: str) -> None:
    """Remove what writers of `uri` killed mid-write left behind: a file's hidden partial copies (an S3 upload that
    never completed shows no object). Call it only while no other writer of `uri` can be running."""
    location = parse(uri)
    if isinstance(location, FileLocation):
        await asyncio.to_thread(_remove_partials, location.path)


def _remove_partials(path: Path) -> None:
    for partial in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        partial.unlink(missing_ok=True)


async def read_chunks(uri: str, chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
    """The object's bytes, `chunk_bytes` at a time (the last chunk may be shorter)."""
    location = parse(uri)
    reader = await asyncio.to_thread(_open_reader, location)
    try:
        with translated_errors(location):
            while chunk := await asyncio.to_thread(reader.read, chunk_bytes):
                yield chunk
    finally:
        reader.close()


async def write_chunks(
    uri: str, chunks: AsyncIterator[bytes], content_type: str | None = None, kms_key_id: str | None = None
) -> int:
    """Store the chunks as the object at `uri`, all or nothing: a failure midway (ours or the iterator's) leaves the
    previous object, if any, as it was; with `kms_key_id`, S3 encrypts it with that KMS key (SSE-KMS). Returns the
    number of bytes written."""
    location = parse(uri)
    writer = await asyncio.to_thread(_open_writer, location, content_type, kms_key_id)
    written = 0
    try:
        with translated_errors(location):
            async for chunk in chunks:
                await asyncio.to_thread(writer.write, chunk)
                written += len(chunk)
            await asyncio.to_thread(writer.commit)
    except BaseException:
        # Shielded: a cancelled write still cleans up its partial file or multipart upload.
        await asyncio.shield(asyncio.to_thread(_abort, writer, location))
        raise
    return written


async def write_bytes(uri: str, data: bytes, content_type: str | None = None, kms_key_id: str | None = None) -> None:
    """`write_chunks` for bytes at hand, in one thread hop rather than one per step (an async job's small answer)."""
    await asyncio.to_thread(_write_whole, parse(uri), data, content_type, kms_key_id)


def write_files(writes: list[tuple[FileLocation, bytes]]) -> list[Exception | None]:
    """Blocking: each (file, bytes) written as `write_bytes` writes it, one after another; per write, None or what
    it raised. Small files written together in one thread call cost the event loop one hop instead of one each
    (async_worker.py groups its jobs' answers)."""
    results: list[Exception | None] = []
    for location, data in writes:
        try:
            _write_whole(location, data, None)
            results.append(None)
        except Exception as exc:  # noqa: BLE001 - each write's caller hears of its own failure
            results.append(exc)
    return results


def _write_whole(location: Location, data: bytes, content_type: str | None, kms_key_id: str | None = None) -> None:
    writer = _open_writer(location, content_type, kms_key_id)
    try:
        with translated_errors(location):
            writer.write(data)
            writer.commit()
    except BaseException:
        _abort(writer, location)
        raise


def _abort(writer: Writer, location: Location) -> None:
    """Clean up after a failed write, without hiding why it failed."""
    try:
        writer.abort()
    except Exception:  # noqa: BLE001 - the write's own error is the one raised
        log.warning("%s: could not clean up after a failed write", location.uri, exc_info=True)


# --- dispatch to a store (blocking: these run in threads) ---------------------------------------------------------


def _size_of(location: Location) -> int:
    with translated_errors(location):
        if isinstance(location, S3Location):
            return s3().head_object(Bucket=location.bucket, Key=location.key)["ContentLength"]
        if not location.path.is_file():
            raise FileNotFoundError(location.path)
        return location.path.stat().st_size


def _delete(location: Location) -> None:
    with translated_errors(location):
        if isinstance(location, S3Location):
            s3().delete_object(Bucket=location.bucket, Key=location.key)
        else:
            location.path.unlink(missing_ok=True)


def _open_reader(location: Location) -> Reader:
    with translated_errors(location):
        if isinstance(location, S3Location):
            return s3().get_object(Bucket=location.bucket, Key=location.key)["Body"]
        return open(location.path, "rb")


def _open_writer(location: Location, content_type: str | None, kms_key_id: str | None = None) -> Writer:
    with translated_errors(location):
        if isinstance(location, S3Location):
            return S3Writer(s3(), location, content_type, kms_key_id)
        if kms_key_id:
            raise ObjectStoreError(f"{location}: a file is not encrypted with a KMS key; only s3:// objects are (SSE-KMS)")
        return FileWriter(location.path)


@contextmanager
def translated_errors(location: Location) -> Iterator[None]:
    """Turn the store's own errors about the caller's URI into ObjectStoreError / ObjectMissing, in words."""
    try:
        yield
    except ClientError as exc:
        if not 400 <= http_status(exc) < 500:
            raise  # S3's own trouble (5xx), not the caller's
        raise _s3_error(location, exc) from None
    except FileNotFoundError:
        raise ObjectMissing(f"{location.uri}: no such file") from None
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        raise ObjectStoreError(f"{location.uri}: {exc.strerror}") from None


# --- file:// ---------------------------------------------------------------------------------------------------


_flush_files = True  # fsync each written file and its folder (see flush_files)


def flush_files(enabled: bool) -> None:
    """Whether a file:// write waits for the disk before it counts as written. The gateway matches its store: with
    SQLite's synchronous=NORMAL a commit does not wait for the disk either (both survive any crash of servelet, and
    a power loss may take the last of both); with FULL or PostgreSQL both wait. Two fsyncs per async output were
    most of the disk's time under load."""
    global _flush_files
    _flush_files = enabled


class FileWriter:
    """Writes a hidden ".NAME.*.partial" file beside the target, then renames it over the target: a rename within a
    directory is atomic, so a reader sees the whole old or the whole new content, and a process killed mid-write
    leaves only the partial file; with `flush_files` on (the default), the fsyncs also make the new content and its
    name survive a power loss once `commit` returns."""

    def __init__(self, path: Path):
        self.path = path
        try:
            fd, partial = self._create_partial()
        except FileNotFoundError:  # its folder is missing: made once, not checked before every write
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, partial = self._create_partial()
        self.partial = Path(partial)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def _create_partial(self) -> tuple[int, str]:
        return tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".partial")

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)

    def commit(self) -> None:
        self.file.flush()
        if _flush_files:
            os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        if _flush_files:
            _fsync_directory(self.path.parent)

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- s3:// ------------------------------------------------------------------------------------------------------


class S3Writer:
    """One PUT for a payload under PART_BYTES; a larger one goes up as a multipart upload, a part as soon as
    PART_BYTES have arrived, so at most one part (plus a chunk) is in memory. S3 shows the object only when the
    upload completes; `abort` drops the parts already sent."""

    def __init__(self, client, location: S3Location, content_type: str | None, kms_key_id: str | None = None):
        self.client, self.location = client, location
        self.extra = {"ContentType": content_type} if content_type else {}
        if kms_key_id:  # S3 encrypts the object with the key (SSE-KMS), as SageMaker asks it to for a KmsKeyId
            self.extra |= {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key_id}
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict] = []

    def write(self, chunk: bytes) -> None:
        self.buffer += chunk
        if len(self.buffer) >= PART_BYTES:
            self._upload_part()

    def commit(self) -> None:
        if self.upload_id is None:
            self.client.put_object(**self._target(), Body=self.buffer, **self.extra)
            return
        if self.buffer:
            self._upload_part()
        self.client.complete_multipart_upload(
            **self._target(), UploadId=self.upload_id, MultipartUpload={"Parts": self.parts}
        )

    def abort(self) -> None:
        self.buffer = bytearray()
        if self.upload_id is not None:
            self.client.abort_multipart_upload(**self._target(), UploadId=self.upload_id)

    def _upload_part(self) -> None:
        if self.upload_id is None:
            self.upload_id = self.client.create_multipart_upload(**self._target(), **self.extra)["UploadId"]
        part, self.buffer = self.buffer, bytearray()
        number = len(self.parts) + 1
        answer = self.client.upload_part(**self._target(), UploadId=self.upload_id, PartNumber=number, Body=part)
        self.parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def _target(self) -> dict:
        return {"Bucket": self.location.bucket, "Key": self.location.key}


def s3():
    """The S3 client model artifacts use (one per process and AWS settings): same endpoint, credentials, region."""
    try:
        return client_for(S3_POOL_CONNECTIONS, tuple(os.environ.get(name) for name in CLIENT_SETTINGS))
    except (BotoCoreError, ValueError) as exc:  # a missing profile, an endpoint URL that is no URL, ...
        raise ObjectStoreError(f"the AWS settings do not make an S3 client: {exc}") from None


def _s3_error(location: Location, exc: ClientError) -> ObjectStoreError:
    """What S3's answer means for this URI (a HEAD's bare 404 says neither whether the bucket or the key is missing)."""
    status, error = http_status(exc), exc.response.get("Error", {})
    code = error.get("Code", "")
    if code == "NoSuchBucket" or (status == 404 and code != "NoSuchKey" and not _bucket_exists(location.bucket)):
        return ObjectStoreError(f"{location.uri}: the bucket {location.bucket!r} does not exist")
    if status == 404:
        return ObjectMissing(f"{location.uri}: no such object")
    if status == 403:
        reason = error.get("Message") or "check the AWS credentials and the bucket's policy"
        return ObjectStoreError(f"{location.uri}: access denied: {reason}")
    return ObjectStoreError(f"{location.uri}: S3 answered {status} {code}: {error.get('Message', '')}")


def _bucket_exists(bucket: str) -> bool:
    try:
        s3().head_bucket(Bucket=bucket)
        return True
    except ClientError as exc:
        return http_status(exc) != 404
