"""servelet.transform's record layer on real stores: files under tmp_path, and S3 through the suite's moto server."""

from __future__ import annotations

import gzip
import json
import os
import zlib

import pytest

from servelet import objects
from servelet.objects import ObjectMissing, ObjectStoreError
from servelet.transform import choices
from servelet.transform.choices import InvalidSetting
from servelet.transform.inputs import InputObject, list_inputs
from servelet.transform.outputs import Assembler, output_uri
from servelet.transform.records import Batch, InvalidInput, batches, records

NESTED_INPUTS = {"in/b.csv": b"b", "in/a/2.csv": b"a2", "in/a/1.csv": b"a1", "in/a/deep/x.csv": b"x", "other/z": b"z"}


async def collect(iterator) -> list:
    return [item async for item in iterator]


async def put(root: str, objects_by_name: dict[str, bytes]) -> None:
    for name, data in objects_by_name.items():
        await objects.write_bytes(objects.join(root, name), data)


def source(uri: str, data_type: str = "S3Prefix") -> dict:
    return {"S3DataSource": {"S3DataType": data_type, "S3Uri": uri}}


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path) -> str:
    """A store's root to put input objects under."""
    if request.param == "file":
        return f"file://{tmp_path}"
    return f"s3://{request.getfixturevalue('s3_env').new_bucket()}"


@pytest.fixture
def local(tmp_path) -> str:
    return f"file://{tmp_path}"


# --- inputs -----------------------------------------------------------------------------------------------------


async def test_s3_prefix_lists_every_object_under_it_in_key_order(root):
    await put(root, NESTED_INPUTS)

    found = await list_inputs(source(f"{root}/in/"))

    assert [(o.name, o.size) for o in found] == [("a/1.csv", 2), ("a/2.csv", 2), ("a/deep/x.csv", 1), ("b.csv", 1)]
    assert found[0].uri == f"{root}/in/a/1.csv"
    # A prefix that is not a folder matches keys that start with it; names stay relative to its folder.
    assert [o.name for o in await list_inputs(source(f"{root}/in/a/"))] == ["1.csv", "2.csv", "deep/x.csv"]
    assert [o.name for o in await list_inputs(source(f"{root}/in/a/d"))] == ["deep/x.csv"]
    with pytest.raises(ObjectStoreError, match="names no input objects"):
        await list_inputs(source(f"{root}/nothing-here/"))


async def test_manifest_lists_its_keys_in_its_order(root):
    await put(root, NESTED_INPUTS)
    manifest = [{"prefix": f"{root}/in/"}, "b.csv", "a/deep/x.csv"]
    await objects.write_bytes(f"{root}/manifest.json", json.dumps(manifest).encode())

    found = await list_inputs(source(f"{root}/manifest.json", "ManifestFile"))

    assert found == [
        InputObject(f"{root}/in/b.csv", "b.csv", 1), InputObject(f"{root}/in/a/deep/x.csv", "a/deep/x.csv", 1)
    ]


async def test_bad_manifests_and_sources_are_refused(local):
    await objects.write_bytes(f"{local}/missing.json", json.dumps([{"prefix": f"{local}/"}, "gone.csv"]).encode())
    await objects.write_bytes(f"{local}/not-json.json", b"[{")
    await objects.write_bytes(f"{local}/no-prefix.json", b'["a.csv"]')

    with pytest.raises(ObjectMissing, match="gone.csv"):
        await list_inputs(source(f"{local}/missing.json", "ManifestFile"))
    with pytest.raises(ObjectStoreError, match="not JSON"):
        await list_inputs(source(f"{local}/not-json.json", "ManifestFile"))
    with pytest.raises(ObjectStoreError, match="a manifest is"):
        await list_inputs(source(f"{local}/no-prefix.json", "ManifestFile"))
    with pytest.raises(InvalidSetting, match="S3DataType: 'AugmentedManifestFile' is not one of S3Prefix, Manifest"):
        await list_inputs(source(f"{local}/", "AugmentedManifestFile"))
    with pytest.raises(InvalidSetting, match="DataSource"):
        await list_inputs({"S3Uri": local})


# --- records ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"a\nb\nc\n", [b"a", b"b", b"c"]),  # a trailing newline makes no empty last record
        (b"a\nb\nc", [b"a", b"b", b"c"]),  # nor does its absence lose the last one
        (b"a\r\nb\r\n", [b"a\r", b"b\r"]),  # split on \n only: the \r stays
        (b"a\n\nb\n", [b"a", b"", b"b"]),  # an empty line is a record: record N is line N
        (b"\n", [b""]),
        (b"", []),
    ],
    ids=["trailing-newline", "no-trailing-newline", "crlf", "empty-line", "only-newline", "empty"],
)
async def test_line_split(local, data, expected):
    uri = f"{local}/in.txt"
    await objects.write_bytes(uri, data)
    # Chunks of 2 bytes: lines cross chunk boundaries.
    assert await collect(records(uri, "None", "Line", chunk_bytes=2)) == expected
    await objects.write_bytes(uri + ".gz", gzip.compress(data))
    assert await collect(records(uri + ".gz", "Gzip", "Line", chunk_bytes=3)) == expected


async def test_no_split_is_the_whole_object_and_gzip_members_are_read_in_turn(root):
    await objects.write_bytes(f"{root}/x.gz", gzip.compress(b"one\n") + gzip.compress(b"two\n"))

    assert await collect(records(f"{root}/x.gz", "Gzip", "None", chunk_bytes=5)) == [b"one\ntwo\n"]
    assert await collect(records(f"{root}/x.gz", "Gzip", "Line")) == [b"one", b"two"]


async def test_bad_gzip_and_unsupported_split_are_refused_in_words(local):
    await objects.write_bytes(f"{local}/plain", b"not gzip\n")
    await objects.write_bytes(f"{local}/cut.gz", gzip.compress(os.urandom(5000))[:-100])

    with pytest.raises(InvalidInput, match="not valid gzip"):
        await collect(records(f"{local}/plain", "Gzip", "Line"))
    with pytest.raises(InvalidInput, match="truncated"):
        await collect(records(f"{local}/cut.gz", "Gzip", "None"))
    with pytest.raises(InvalidSetting, match="SplitType: 'RecordIO' is not supported by servelet; accepted: None, Li"):
        await collect(records(f"{local}/plain", "None", "RecordIO"))


def test_settings_are_checked_naming_the_field_and_what_it_accepts():
    assert (choices.compression_type(None), choices.split_type(None), choices.assemble_with(None)) == ("None",) * 3
    assert choices.batch_strategy(None) == "MultiRecord"
    assert choices.max_payload_bytes(None) == 6 << 20
    with pytest.raises(InvalidSetting, match="CompressionType: 'Zip' is not one of None, Gzip"):
        choices.compression_type("Zip")
    with pytest.raises(InvalidSetting, match="BatchStrategy: 'Multi' is not one of SingleRecord, MultiRecord"):
        choices.batch_strategy("Multi")
    with pytest.raises(InvalidSetting, match="SplitType: 'TFRecord' is not supported"):
        choices.split_type("TFRecord")
    with pytest.raises(InvalidSetting, match="AssembleWith: 'Json' is not one of None, Line"):
        Assembler("Json")
    with pytest.raises(InvalidSetting, match="MaxPayloadInMB: 0 must be a whole number from 1 to 100"):
        choices.max_payload_bytes(0)


# --- batches ----------------------------------------------------------------------------------------------------


async def some(*items: bytes):
    for item in items:
        yield item


async def test_single_record_sends_one_record_per_request():
    found = await collect(batches(some(b"a", b"bb", b""), "SingleRecord", 10, file=3))
    assert found == [Batch(0, 1, b"a", file=3), Batch(1, 1, b"bb", file=3), Batch(2, 1, b"", file=3)]


async def test_multi_record_packs_whole_records_up_to_the_payload_bound():
    # "aaa\nbbb" is 7 bytes: exactly the bound; a third record would make 11.
    found = await collect(batches(some(b"aaa", b"bbb", b"ccc", b"dd", b"e"), "MultiRecord", 7))
    assert found == [Batch(0, 2, b"aaa\nbbb"), Batch(2, 2, b"ccc\ndd"), Batch(4, 1, b"e")]
    assert all(len(batch.body) <= 7 for batch in found)


async def test_an_oversized_record_is_reported_and_the_job_goes_on():
    for strategy in ("SingleRecord", "MultiRecord"):
        found = await collect(batches(some(b"a", b"b", b"x" * 9, b"c"), strategy, 8))
        error = found[-2].error
        assert found[-2] == Batch(2, 1, b"", error) and "record 2 is 9 bytes, over MaxPayloadInMB (8 bytes)" in error
        assert found[-1] == Batch(3, 1, b"c")
        assert [index for batch in found for index in range(batch.first, batch.end)] == [0, 1, 2, 3]


@pytest.mark.parametrize("strategy", ["SingleRecord", "MultiRecord"])
async def test_resuming_after_a_checkpoint_gives_exactly_the_remaining_records(strategy):
    lines = [f"record-{i}".encode() for i in range(50)]
    everything = await collect(batches(some(*lines), strategy, 40))
    for checkpoint in everything[:-1]:
        resumed = await collect(batches(some(*lines), strategy, 40, start_after=checkpoint.end))
        sent = [record for batch in resumed for record in batch.body.split(b"\n")]
        assert sent == lines[checkpoint.end:]
        assert resumed[0].first == checkpoint.end
    assert await collect(batches(some(*lines), strategy, 40, start_after=50)) == []


# --- outputs ----------------------------------------------------------------------------------------------------


def test_output_keeps_the_input_s_relative_key():
    nested = InputObject("s3://bucket/in/a/b.jsonl", "a/b.jsonl", 10)
    assert output_uri("s3://bucket/out", nested) == "s3://bucket/out/a/b.jsonl.out"
    assert output_uri("s3://bucket/out/", nested) == "s3://bucket/out/a/b.jsonl.out"
    assert output_uri("file:///data/out", nested) == "file:///data/out/a/b.jsonl.out"


def test_assemble_with_line_ends_each_response_with_one_newline():
    line = Assembler("Line")
    assert [line.assemble(r) for r in (b'{"p": 1}', b'{"p": 2}\n', b"", b"1\n2\n")] == [
        b'{"p": 1}\n', b'{"p": 2}\n', b"\n", b"1\n2\n",
    ]
    assert [Assembler("None").assemble(r) for r in (b"1", b"2\n")] == [b"1", b"2\n"]
    assert Assembler().assemble(b"x") == b"x"


# --- streaming --------------------------------------------------------------------------------------------------

LARGE_BYTES = 50 << 20
RSS_GROWTH_BOUND = 30 << 20


def reset_peak_rss() -> None:
    """Start the high-water mark from now (Linux's clear_refs "5"), so an earlier test's peak cannot hide ours."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # then the mark only counts peaks above the earlier one: still a bound, a looser one


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


async def test_a_large_gzipped_line_input_streams(local, tmp_path):
    """50 MB of lines (written compressed, a line at a time) go through without the process holding them."""
    line = b"x" * 99
    count = LARGE_BYTES // (len(line) + 1) // 1000 * 1000
    path = tmp_path / "large.jsonl.gz"
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    with open(path, "wb") as out:
        for _ in range(count // 1000):
            out.write(compressor.compress((line + b"\n") * 1000))
        out.write(compressor.flush())

    reset_peak_rss()
    before = peak_rss()
    seen = total = 0
    async for batch in batches(records(f"{local}/large.jsonl.gz", "Gzip", "Line"), "MultiRecord", 1 << 20):
        assert batch.first == seen and batch.error is None and len(batch.body) <= 1 << 20
        seen, total = batch.end, total + len(batch.body) - batch.count + 1  # the record bytes, less the joins
    growth = peak_rss() - before

    assert (seen, total) == (count, count * len(line))
    assert growth < RSS_GROWTH_BOUND, f"peak RSS grew by {growth >> 20} MB while streaming {LARGE_BYTES >> 20} MB"
