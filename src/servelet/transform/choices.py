"""The settings of a SageMaker transform job that pick a behaviour, checked with messages naming the field and
what it accepts, so the API layer can refuse a job before it starts rather than fail it halfway."""

from __future__ import annotations

from collections.abc import Iterable

S3_DATA_TYPES = ("S3Prefix", "ManifestFile")
COMPRESSION_TYPES = ("None", "Gzip")
SPLIT_TYPES = ("None", "Line")
BATCH_STRATEGIES = ("SingleRecord", "MultiRecord")
ASSEMBLE_WITH = ("None", "Line")
# SageMaker's own formats we do not read: named so the refusal says they are known, just not supported here.
UNSUPPORTED_SPLIT_TYPES = ("RecordIO", "TFRecord")
# SageMaker's defaults and bound for MaxPayloadInMB (0, its "stream the object" mode, is not supported here).
DEFAULT_MAX_PAYLOAD_MB = 6
MAX_PAYLOAD_MB_LIMIT = 100
MB = 1 << 20


class InvalidSetting(ValueError):
    """A transform job's setting servelet does not accept: the caller's to fix."""


def s3_data_type(value: str | None) -> str:
    return _choice("S3DataType", value, S3_DATA_TYPES, default=None)


def compression_type(value: str | None) -> str:
    return _choice("CompressionType", value, COMPRESSION_TYPES, default="None")


def split_type(value: str | None) -> str:
    if value in UNSUPPORTED_SPLIT_TYPES:
        raise InvalidSetting(f"SplitType: {value!r} is not supported by servelet; accepted: {_listed(SPLIT_TYPES)}")
    return _choice("SplitType", value, SPLIT_TYPES, default="None")


def batch_strategy(value: str | None) -> str:
    return _choice("BatchStrategy", value, BATCH_STRATEGIES, default="MultiRecord")


def assemble_with(value: str | None) -> str:
    return _choice("AssembleWith", value, ASSEMBLE_WITH, default="None")


def max_payload_bytes(megabytes: int | None) -> int:
    """MaxPayloadInMB as bytes (SageMaker's MB is MiB); missing means SageMaker's default of 6."""
    if megabytes is None:
        megabytes = DEFAULT_MAX_PAYLOAD_MB
    if isinstance(megabytes, bool) or not isinstance(megabytes, int) or not 1 <= megabytes <= MAX_PAYLOAD_MB_LIMIT:
        raise InvalidSetting(f"MaxPayloadInMB: {megabytes!r} must be a whole number from 1 to {MAX_PAYLOAD_MB_LIMIT}")
    return megabytes * MB


def _choice(field: str, value: str | None, accepted: tuple[str, ...], default: str | None) -> str:
    if value is None and default is not None:
        return default
    if value not in accepted:
        raise InvalidSetting(f"{field}: {value!r} is not one of {_listed(accepted)}")
    return value


def _listed(values: Iterable[str]) -> str:
    return ", ".join(values)
