"""Which objects a transform job reads, in the order it reads them: SageMaker's TransformDataSource.S3DataSource,
on s3:// and, the same way, on file://.

An `S3Prefix` is every object whose key starts with the URI's key, in key order (on file://: every file below the
prefix's directory whose path starts with the prefix, sorted as S3 sorts keys). A `ManifestFile` lists the objects:
`[{"prefix": "s3://bucket/prefix/"}, "relative/key1", ...]`, read in the manifest's order.

Each object's `name` is what its output is named after (`<S3OutputPath>/<name>.out`): its key relative to the
prefix's "directory" (up to the prefix's last "/"), so `in/a/b.jsonl` under `in/` or `in/a` is `a/b.jsonl`; for a
manifest, the relative key as listed.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass

from .. import objects
from ..objects import ObjectStoreError, S3Location
from . import choices

ACCEPTED_PREFIXES = "s3://BUCKET/PREFIX, file:///ABSOLUTE/PREFIX or /ABSOLUTE/PREFIX"


@dataclass(frozen=True)
class InputObject:
    uri: str
    name: str
    size: int


async def list_inputs(data_source: dict) -> list[InputObject]:
    """The objects a TransformDataSource names; ObjectStoreError when it names none, or names one that is missing."""
    s3_data_source = data_source.get("S3DataSource") if isinstance(data_source, dict) else None
    if not isinstance(s3_data_source, dict) or not isinstance(s3_data_source.get("S3Uri"), str):
        raise choices.InvalidSetting("DataSource: must be {'S3DataSource': {'S3DataType': ..., 'S3Uri': ...}}")
    data_type = choices.s3_data_type(s3_data_source.get("S3DataType"))
    uri = s3_data_source["S3Uri"]
    if data_type == "ManifestFile":
        found = await _listed_in_manifest(uri)
    else:
        found = await asyncio.to_thread(_under_prefix, uri)
    if not found:
        raise ObjectStoreError(f"{uri}: the {data_type} names no input objects")
    return found


# --- S3Prefix ---------------------------------------------------------------------------------------------------


def _under_prefix(prefix: str) -> list[InputObject]:
    if prefix.startswith("s3://"):
        return _s3_under_prefix(prefix)
    path = prefix.removeprefix("file://")
    if "://" in path or not path.startswith("/"):
        raise ObjectStoreError(f"{prefix!r}: an input prefix is {ACCEPTED_PREFIXES}")
    objects.check_confined(prefix, path)
    return _files_under_prefix(prefix, path)


def _s3_under_prefix(prefix: str) -> list[InputObject]:
    bucket, _, key_prefix = prefix.removeprefix("s3://").partition("/")
    if not bucket:
        raise ObjectStoreError(f"{prefix!r}: an s3:// prefix names a bucket")
    directory = key_prefix[: key_prefix.rfind("/") + 1]
    found = []
    with objects.translated_errors(S3Location(prefix, bucket, key_prefix)):
        for page in objects.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            for entry in page.get("Contents", []):
                key = entry["Key"]
                if not key.endswith("/"):  # a console's "folder" marker, not an object to transform
                    found.append(InputObject(f"s3://{bucket}/{key}", key.removeprefix(directory), entry["Size"]))
    return found


def _files_under_prefix(prefix: str, path_prefix: str) -> list[InputObject]:
    directory = path_prefix[: path_prefix.rfind("/") + 1]
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if path.startswith(path_prefix) and os.path.isfile(path):
                relative = path.removeprefix(directory)
                found.append(InputObject(f"file://{path}", relative, os.path.getsize(path)))
    # S3 lists keys in the order of their UTF-8 bytes; sorting the paths the same way makes both stores agree.
    return sorted(found, key=lambda found_object: found_object.uri.encode())


# --- ManifestFile -----------------------------------------------------------------------------------------------


async def _listed_in_manifest(manifest_uri: str) -> list[InputObject]:
    text = b"".join([chunk async for chunk in objects.read_chunks(manifest_uri)])
    prefix, keys = _parse_manifest(manifest_uri, text)
    uris = [prefix + key for key in keys]
    sizes = await asyncio.gather(*(objects.size(uri) for uri in uris))
    return [InputObject(uri, key, size) for uri, key, size in zip(uris, keys, sizes)]


def _parse_manifest(manifest_uri: str, text: bytes) -> tuple[str, list[str]]:
    form = '[{"prefix": "s3://bucket/prefix/"}, "relative/key1", "relative/key2", ...]'
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise ObjectStoreError(f"{manifest_uri}: the manifest is not JSON ({exc}); a manifest is {form}") from None
    if (
        not isinstance(manifest, list)
        or not manifest
        or not isinstance(manifest[0], dict)
        or not isinstance(manifest[0].get("prefix"), str)
        or not all(isinstance(key, str) and key and not key.startswith("/") for key in manifest[1:])
    ):
        raise ObjectStoreError(f"{manifest_uri}: a manifest is {form} (relative keys, not empty)")
    return manifest[0]["prefix"], manifest[1:]
