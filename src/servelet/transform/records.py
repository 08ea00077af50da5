"""The records of one input object and the request bodies made from them, streamed: a Line-split object is read a
chunk at a time and never held whole, however large.

Decisions where SageMaker's documentation is silent:
- Line split splits on b"\\n" only: a "\\r" before it stays in the record (as SageMaker's splitter does); a trailing
  newline ends the last record rather than starting an empty one.
- Empty lines between others are records (empty ones), so record N is always line N of the object: outputs
  assembled by Line stay aligned with their inputs, and a checkpoint's record index is a line number.
- With split None the whole object is the one record, even when it is empty.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from .. import objects
from . import choices

RECORD_SEPARATOR = b"\n"


class InvalidInput(ValueError):
    """An input object that cannot be read as the job says (not gzip, truncated): the job's data to fix."""


@dataclass(frozen=True)
class Batch:
    """One request's body: records `first` to `first + count - 1` of input object number `file`. `error` says why
    the records were not sent (a record over MaxPayloadInMB); the body is then empty and the job goes on."""

    first: int
    count: int
    body: bytes
    error: str | None = None
    file: int = 0

    @property
    def end(self) -> int:
        """The number of records done once this batch is: what to checkpoint and pass back as `start_after`."""
        return self.first + self.count


async def records(
    uri: str, compression: str = "None", split: str = "None", chunk_bytes: int = objects.CHUNK_BYTES
) -> AsyncIterator[bytes]:
    """The object's records, in order, per CompressionType and SplitType."""
    compression, split = choices.compression_type(compression), choices.split_type(split)
    chunks = objects.read_chunks(uri, chunk_bytes)
    if compression == "Gzip":
        chunks = _gunzipped(uri, chunks, chunk_bytes)
    if split == "Line":
        async for line in _lines(chunks):
            yield line
    else:
        yield b"".join([chunk async for chunk in chunks])


async def batches(
    records_iter: AsyncIterable[bytes],
    strategy: str,
    max_payload_bytes: int,
    start_after: int = 0,
    file: int = 0,
) -> AsyncIterator[Batch]:
    """Request bodies per BatchStrategy: one record each (SingleRecord), or as many whole records as fit in
    `max_payload_bytes` joined by newlines (MultiRecord). `start_after` records (a checkpoint's `Batch.end`) are
    skipped, so a resumed job neither repeats nor drops one."""
    strategy = choices.batch_strategy(strategy)
    if max_payload_bytes < 1:
        raise choices.InvalidSetting(f"max_payload_bytes: {max_payload_bytes} must be at least 1")
    pending: list[bytes] = []
    pending_bytes = 0
    first = start_after
    index = -1
    async for record in records_iter:
        index += 1
        if index < start_after:
            continue
        if len(record) > max_payload_bytes:
            if pending:
                yield Batch(first, len(pending), RECORD_SEPARATOR.join(pending), file=file)
                pending, pending_bytes = [], 0
            yield Batch(index, 1, b"", _oversized(index, len(record), max_payload_bytes), file=file)
            first = index + 1
            continue
        joined_bytes = pending_bytes + len(RECORD_SEPARATOR) + len(record)
        if pending and (strategy == "SingleRecord" or joined_bytes > max_payload_bytes):
            yield Batch(first, len(pending), RECORD_SEPARATOR.join(pending), file=file)
            pending, pending_bytes = [], 0
        if not pending:
            first, pending_bytes = index, len(record)
        else:
            pending_bytes = joined_bytes
        pending.append(record)
    if pending:
        yield Batch(first, len(pending), RECORD_SEPARATOR.join(pending), file=file)


def _oversized(index: int, size: int, max_payload_bytes: int) -> str:
    return (
        f"record {index} is {size} bytes, over MaxPayloadInMB ({max_payload_bytes} bytes); "
        "raise MaxPayloadInMB or split the record"
    )


async def _lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Lines without their b"\\n"; a line spanning chunks is joined once, not re-copied per chunk."""
    pending: list[bytes] = []
    async for chunk in chunks:
        pieces = chunk.split(RECORD_SEPARATOR)
        if len(pieces) == 1:
            pending.append(chunk)
            continue
        pending.append(pieces[0])
        yield b"".join(pending)
        for line in pieces[1:-1]:
            yield line
        pending = [pieces[-1]]
    last = b"".join(pending)
    if last:
        yield last


async def _gunzipped(uri: str, chunks: AsyncIterable[bytes], chunk_bytes: int) -> AsyncIterator[bytes]:
    """Inflate gzip as it arrives, at most `chunk_bytes` out per step (a small, highly compressed chunk must not
    become one huge one); concatenated gzip members are read one after the other, as `gzip` does."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        async for chunk in chunks:
            while chunk:
                if inflater.eof:  # the next member
                    inflater = zlib.decompressobj(wbits=31)
                if inflated := inflater.decompress(chunk, chunk_bytes):
                    yield inflated
                chunk = inflater.unconsumed_tail or (inflater.unused_data if inflater.eof else b"")
        if rest := inflater.flush():
            yield rest
    except zlib.error as exc:
        raise InvalidInput(f"{uri}: CompressionType is Gzip but the object is not valid gzip ({exc})") from None
    if not inflater.eof:
        raise InvalidInput(f"{uri}: CompressionType is Gzip but the object's gzip stream is truncated")
