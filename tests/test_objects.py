"""servelet.objects on real stores: files under tmp_path, and S3 through the suite's moto server."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from servelet import objects
from servelet.objects import ObjectMissing, ObjectStoreError

LARGE_BYTES = 20 << 20  # more than two S3 parts
ODD_CHUNK = (1 << 20) + 7  # chunks that do not line up with the parts


class Payload:
    """`total` random bytes, made a chunk at a time (never whole); `sha256` is of what has been made so far."""

    def __init__(self, total: int, chunk: int = ODD_CHUNK, fail_after: int | None = None):
        self.total, self.chunk, self.fail_after = total, chunk, fail_after
        self.hash = hashlib.sha256()

    async def chunks(self):
        made = 0
        while made < self.total:
            if self.fail_after is not None and made >= self.fail_after:
                raise ConnectionResetError("the client went away")
            chunk = os.urandom(min(self.chunk, self.total - made))
            self.hash.update(chunk)
            made += len(chunk)
            yield chunk

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()


async def read_sha256(uri: str) -> tuple[str, int, int]:
    """(sha256, size, largest chunk) of the object, read as a stream."""
    digest, total, largest = hashlib.sha256(), 0, 0
    async for chunk in objects.read_chunks(uri):
        digest.update(chunk)
        total += len(chunk)
        largest = max(largest, len(chunk))
    return digest.hexdigest(), total, largest


@pytest.fixture
def bucket(s3_env) -> str:
    return s3_env.new_bucket()


@pytest.fixture(params=["file", "s3"])
def prefix(request, tmp_path) -> str:
    """A place to write objects under, in each store."""
    if request.param == "file":
        return f"file://{tmp_path}/out"
    return f"s3://{request.getfixturevalue('bucket')}/out"


@pytest.mark.parametrize("total", [0, 1000, LARGE_BYTES], ids=["empty", "small", "multipart"])
async def test_round_trip_streams(prefix, total):
    uri = objects.join(prefix, "id.out")
    payload = Payload(total)

    assert await objects.write_chunks(uri, payload.chunks()) == total

    assert await objects.size(uri) == total
    assert await objects.exists(uri)
    assert await read_sha256(uri) == (payload.sha256, total, min(total, objects.CHUNK_BYTES))


async def test_write_bytes_and_delete(prefix):
    uri = objects.join(prefix, "deep/er/answer.json")
    await objects.write_bytes(uri, b'{"ok": true}', content_type="application/json")
    assert [chunk async for chunk in objects.read_chunks(uri, chunk_bytes=5)] == [b'{"ok"', b": tru", b"e}"]

    await objects.delete(uri)
    assert not await objects.exists(uri)
    await objects.delete(uri)  # gone already: no error


async def test_missing_object_names_the_uri(prefix):
    uri = objects.join(prefix, "nothing-here")
    with pytest.raises(ObjectMissing, match="nothing-here"):
        await objects.size(uri)
    with pytest.raises(ObjectMissing, match=uri):
        [chunk async for chunk in objects.read_chunks(uri)]
    assert not await objects.exists(uri)


@pytest.mark.parametrize("fail_after", [3 << 20, 12 << 20], ids=["before-a-part", "after-a-part"])
async def test_interrupted_write_leaves_the_old_object(prefix, fail_after):
    uri = objects.join(prefix, "id.out")
    await objects.write_bytes(uri, b"old answer")

    with pytest.raises(ConnectionResetError):
        await objects.write_chunks(uri, Payload(LARGE_BYTES, fail_after=fail_after).chunks())

    assert [chunk async for chunk in objects.read_chunks(uri)] == [b"old answer"]


async def test_interrupted_file_write_leaves_no_file(tmp_path):
    uri = f"{tmp_path}/out/id.out"  # a plain absolute path is a file too
    with pytest.raises(ConnectionResetError):
        await objects.write_chunks(uri, Payload(LARGE_BYTES, fail_after=3 << 20).chunks())

    assert not await objects.exists(uri)
    assert list((tmp_path / "out").iterdir()) == []  # no .id.out.*.partial left behind


async def test_file_write_goes_through_a_hidden_partial_file(tmp_path):
    uri = f"file://{tmp_path}/id.out"
    seen: list[list[str]] = []

    async def chunks():
        yield b"first"
        seen.append(sorted(path.name for path in tmp_path.iterdir()))
        yield b"second"

    await objects.write_chunks(uri, chunks())

    [[partial]] = seen
    assert partial.startswith(".id.out.") and partial.endswith(".partial")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["id.out"]
    assert (tmp_path / "id.out").read_bytes() == b"firstsecond"


async def test_interrupted_s3_write_leaves_no_object_and_no_upload(s3_env, bucket):
    uri = f"s3://{bucket}/out/id.out"
    with pytest.raises(ConnectionResetError):
        await objects.write_chunks(uri, Payload(LARGE_BYTES, fail_after=12 << 20).chunks())

    assert not await objects.exists(uri)
    assert s3_env.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


async def test_s3_small_payload_is_one_put_and_large_one_multipart(s3_env, bucket):
    small, large = f"s3://{bucket}/small", f"s3://{bucket}/large"
    await objects.write_bytes(small, b"x" * 1000, content_type="application/json")
    await objects.write_chunks(large, Payload(LARGE_BYTES).chunks(), content_type="application/x-npy")

    assert s3_env.requests("PUT", f"/{bucket}/small") and not s3_env.requests("POST", f"/{bucket}/small")
    # create, complete: the parts in between are PUTs with a part number
    assert len(s3_env.requests("POST", f"/{bucket}/large")) == 2
    client = s3_env.client()
    assert client.head_object(Bucket=bucket, Key="small")["ContentType"] == "application/json"
    assert client.head_object(Bucket=bucket, Key="large")["ContentType"] == "application/x-npy"


async def test_a_kms_key_has_s3_encrypt_the_object_and_a_file_refuses_one(s3_env, bucket, tmp_path):
    key = "arn:aws:kms:us-east-1:123456789012:key/k"
    await objects.write_bytes(f"s3://{bucket}/small", b"x", kms_key_id=key)
    await objects.write_chunks(f"s3://{bucket}/large", Payload(LARGE_BYTES).chunks(), kms_key_id=key)
    for name in ("small", "large"):
        head = s3_env.client().head_object(Bucket=bucket, Key=name)
        assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", key)
    with pytest.raises(ObjectStoreError, match="not encrypted with a KMS key"):
        await objects.write_bytes(f"file://{tmp_path}/out", b"x", kms_key_id=key)


async def test_s3_missing_bucket_is_named(s3_env):
    uri = "s3://no-such-bucket-here/key"
    with pytest.raises(ObjectStoreError, match="bucket 'no-such-bucket-here' does not exist") as raised:
        await objects.size(uri)
    assert not isinstance(raised.value, ObjectMissing)
    with pytest.raises(ObjectStoreError, match="no-such-bucket-here"):
        await objects.write_bytes(uri, b"answer")


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("ftp://x", "unsupported scheme"),
        ("s3://bucket-only", "a bucket and a key"),
        ("s3://bucket/prefix/", "a bucket and a key"),
        ("relative/path", "must be absolute"),
        ("file://relative/path", "must be absolute"),
        ("/some/directory/", "not a directory"),
        ("", "must be absolute"),
    ],
)
async def test_bad_uris_say_what_is_accepted(uri, problem):
    with pytest.raises(ObjectStoreError, match=problem) as raised:
        await objects.size(uri)
    assert repr(uri) in str(raised.value)
    assert "s3://BUCKET/KEY" in str(raised.value)


@pytest.mark.parametrize(
    ("prefix", "name", "joined"),
    [
        ("s3://b/out", "id.out", "s3://b/out/id.out"),
        ("s3://b/out/", "id.out", "s3://b/out/id.out"),
        ("s3://b", "id.out", "s3://b/id.out"),
        ("file:///data/out", "id.out", "file:///data/out/id.out"),
        ("file:///", "id.out", "file:///id.out"),
        ("/data/out", "sub/id.out", "/data/out/sub/id.out"),
    ],
)
def test_join(prefix, name, joined):
    assert objects.join(prefix, name) == joined


@pytest.mark.parametrize(("prefix", "name"), [("s3://b/out", ""), ("s3://b/out", "/abs"), ("ftp://x", "id.out")])
def test_join_refuses_what_names_no_object(prefix, name):
    with pytest.raises(ObjectStoreError):
        objects.join(prefix, name)


def test_a_killed_writers_partial_copies_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "job.out").write_text("done")
    for leftover in (".job.out.abc123.partial", ".job.out.x.partial"):
        (tmp_path / leftover).write_text("half")
    (tmp_path / ".other.out.abc.partial").write_text("another job's, maybe being written now")
    (tmp_path / ".job.outx.abc.partial").write_text("a different name")
    asyncio.run(objects.remove_unfinished_writes(f"file://{tmp_path}/job.out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".job.outx.abc.partial", ".other.out.abc.partial", "job.out"]


@pytest.mark.parametrize("flushed", [True, False])
def test_a_file_write_waits_for_the_disk_only_when_told(tmp_path, monkeypatch, flushed):
    """The gateway flushes outputs exactly when its store flushes commits (objects.flush_files); either way the
    write is whole and atomic."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    monkeypatch.setattr(objects, "_flush_files", True)
    objects.flush_files(flushed)
    asyncio.run(objects.write_bytes(f"file://{tmp_path}/out/job.out", b"answer", "text/plain"))
    assert (tmp_path / "out" / "job.out").read_bytes() == b"answer"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["job.out"]
    assert len(synced) == (2 if flushed else 0)  # the file, then its folder (the new name)


def test_files_written_together_each_hear_of_their_own_failure(tmp_path):
    """The async worker writes its jobs' answers in one thread call (objects.write_files): one that fails fails alone."""
    (tmp_path / "taken").write_text("a file where a folder should be")
    writes = [(objects.parse(f"file://{tmp_path}/{name}"), name.encode()) for name in ("a.out", "taken/b.out", "new/c.out")]
    results = objects.write_files(writes)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], ObjectStoreError)
    assert (tmp_path / "a.out").read_bytes() == b"a.out" and (tmp_path / "new" / "c.out").read_bytes() == b"new/c.out"
