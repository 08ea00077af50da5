"""The llama.cpp build: chosen for this CPU, cached under a key no other CPU shares, patched, self-tested.

AMX itself runs only on CPUs that have it; on others these tests still check the choice, the cache key, the
fallback when an AMX build crashes, and that the patch keeps the tile configuration the compiler used to drop.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from servelet.engine.llama import LlamaModel, build_facts

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("llama_build", ROOT / "install" / "llama_build.py")
llama_build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(llama_build)

AMX_CPU = {"avx512f", "avx512vnni", "amx_tile", "amx_int8", "amx_bf16"}
PLAIN_CPU = {"avx2", "fma", "avx512f"}
MMQ = "vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp"


def never_asked():
    raise AssertionError("the kernel is asked for AMX only when the CPU has it and nobody said off")


def test_amx_is_chosen_only_where_the_cpu_has_it_the_kernel_grants_it_and_nobody_said_off():
    assert llama_build.choose(AMX_CPU, None, lambda: True).variant == "amx"
    assert llama_build.choose(AMX_CPU, "on", lambda: True).variant == "amx"
    refused = llama_build.choose(AMX_CPU, None, lambda: False)
    assert refused.variant == "noamx" and "kernel refuses" in refused.why
    plain = llama_build.choose(PLAIN_CPU, None, never_asked)
    assert plain.variant == "noamx" and "no AMX" in plain.why
    for off in ("off", "OFF", "0", "false"):
        forced = llama_build.choose(AMX_CPU, off, never_asked)
        assert forced.variant == "noamx" and "SERVELET_LLAMA_CPP_AMX" in forced.why


def test_the_no_amx_build_turns_amx_off_and_keeps_everything_else_native():
    amx, noamx = llama_build.describe("amx"), llama_build.describe("noamx")
    assert "-DGGML_NATIVE=ON" in amx.cmake_args and "amx" not in amx.cmake_args
    assert "-DGGML_NATIVE=ON" in noamx.cmake_args and "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in noamx.cmake_args
    assert amx.key != noamx.key
    assert noamx.wheel_version == f"{noamx.version}+noamx.k{noamx.key[:12]}"


def test_a_wheel_cached_on_another_cpu_is_not_reused_here(tmp_path, monkeypatch):
    """The key hashes the instruction sets `-march=native` turns on: an AMX machine's wheel has another one."""
    monkeypatch.setenv("SERVELET_BUILD_CACHE", str(tmp_path))
    here = llama_build.describe("noamx")
    monkeypatch.setattr(llama_build, "native_flags", lambda _cc: here.native_flags + " -mamx-tile -mamx-int8")
    elsewhere = llama_build.describe("noamx")
    monkeypatch.undo()
    monkeypatch.setenv("SERVELET_BUILD_CACHE", str(tmp_path))
    assert elsewhere.key != here.key
    (tmp_path / elsewhere.key).mkdir()
    (tmp_path / elsewhere.key / f"llama_cpp_python-{elsewhere.wheel_version}-py3-none-linux_x86_64.whl").touch()
    assert llama_build.cached_wheel(elsewhere) is not None
    assert llama_build.cached_wheel(llama_build.describe("noamx")) is None


def test_the_native_flags_are_the_compilers_own_expansion_of_march_native():
    flags = llama_build.native_flags("cc").split()
    assert any(flag.startswith("-march=") for flag in flags)
    assert ("-mamx-tile" in flags) == ("amx_tile" in llama_build.cpu_flags())


class FakeInstall:
    """Stands in for compiling and pip (minutes) around ensure(); the self-test's outcome is scripted."""

    def __init__(self, tmp_path: Path, self_test_codes: dict[str, int]):
        self.codes = self_test_codes
        self.installed: str | None = None
        self.record = tmp_path / "record.json"
        self.built: list[str] = []

    def build_wheel(self, build):
        self.built.append(build.variant)
        folder = llama_build.cache_root() / build.key
        folder.mkdir(parents=True, exist_ok=True)
        wheel = folder / f"llama_cpp_python-{build.wheel_version}-py3-none-any.whl"
        wheel.touch()
        return wheel

    def install(self, _python, wheel: Path):
        self.installed = wheel.name.split("-")[1]

    def self_test(self, _python):
        variant = self.installed.split("+")[1].split(".")[0]
        code = self.codes[variant]
        return subprocess.CompletedProcess([], code, stdout="{}" if code == 0 else "", stderr="boom" if code else "")

    def patch(self, monkeypatch):
        monkeypatch.setattr(llama_build, "build_wheel", self.build_wheel)
        monkeypatch.setattr(llama_build, "install", self.install)
        monkeypatch.setattr(llama_build, "self_test", self.self_test)
        monkeypatch.setattr(llama_build, "installed_version", lambda _python: self.installed)
        monkeypatch.setattr(llama_build, "record_path", lambda _python: self.record)


def test_an_amx_build_that_crashes_in_its_self_test_falls_back_to_no_amx_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SERVELET_BUILD_CACHE", str(tmp_path / "cache"))
    fake = FakeInstall(tmp_path, {"amx": -11, "noamx": 0})
    fake.patch(monkeypatch)
    amx = llama_build.Choice("amx", "test")
    assert llama_build.ensure(sys.executable, amx, run_self_test=True) == 0
    assert fake.built == ["amx", "noamx"] and "+noamx." in fake.installed
    assert "died by SIGSEGV" in capsys.readouterr().err
    assert json.loads(fake.record.read_text())["self_test"] == "passed"
    assert llama_build.crash_note(llama_build.describe("amx")).exists()

    # The next install remembers: straight to the no-AMX build, nothing compiled, nothing crashes again.
    fake.record.unlink()
    fake.installed = None
    assert llama_build.ensure(sys.executable, amx, run_self_test=True) == 0
    assert fake.built == ["amx", "noamx"] and "+noamx." in fake.installed
    assert "crashed in its self-test on this machine before" in capsys.readouterr().out


def test_a_no_amx_build_that_crashes_fails_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SERVELET_BUILD_CACHE", str(tmp_path / "cache"))
    FakeInstall(tmp_path, {"noamx": -4}).patch(monkeypatch)
    assert llama_build.ensure(sys.executable, llama_build.Choice("noamx", "test"), run_self_test=True) == 1
    assert "died by SIGILL" in capsys.readouterr().err


def test_the_installed_llama_cpp_is_servelets_build_for_this_machine():
    """`make install` put the keyed build here, not a wheel pip's cache had from anywhere."""
    choice = llama_build.choose(llama_build.cpu_flags(), None, llama_build.kernel_grants_amx)
    wanted = {llama_build.describe(variant).wheel_version for variant in {choice.variant, "noamx"}}
    facts = build_facts()
    assert facts.version in wanted, f"installed {facts.version}; this machine's builds are {sorted(wanted)}"
    assert facts.amx_compiled == (facts.variant == "amx")


def test_the_self_test_decodes_the_default_model_in_a_subprocess(llama_cpp_runs):
    result = subprocess.run([sys.executable, "-m", "servelet.engine.selftest"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Berlin" in report["continuations"][0]
    assert "CPU :" in result.stderr.splitlines()[0]  # the build's system info comes first, before any decode
    assert "llama-cpp-python" in report["build"]


def greedy_run(model: LlamaModel, prompt: str, new_tokens: int) -> tuple[list[int], list[float]]:
    """One sequence alone, greedy: its tokens and each token's log-probability."""
    tokens = model.tokenize(prompt)
    picked, logprobs = [], []
    model.batch.clear()
    model.batch.add(tokens, 0, 0, want_last_logits=True)
    for step in range(new_tokens):
        assert model.decode() == 0
        row = model.logits_rows(1)[0].astype("float64")
        token = int(row.argmax())
        picked.append(token)
        logprobs.append(float(row[token] - row.max() - np.log(np.exp(row - row.max()).sum())))
        model.batch.clear()
        model.batch.add([token], len(tokens) + step, 0, want_last_logits=True)
    model.forget(0)
    return picked, logprobs


AGREEMENT_PROMPTS = (
    "The capital of France is",
    "Water is made of hydrogen and",
    "The first person to walk on the Moon was",
    "Photosynthesis is the process by which plants",
    "The largest ocean on Earth is the",
    "In 1492, Christopher Columbus",
)


def test_the_amx_or_repacked_kernels_answer_as_the_plain_kernels_do_within_rounding(model_path):
    """With AMX on, the weights sit in AMX tiles; without extra buffers the same build runs ggml's plain kernels.

    Rounding differs between kernels, so greedy texts may part after a while (docs/engine.md): most prompts must
    agree on every token, and where tokens agree their log-probabilities must be close."""
    from servelet.engine.llama import ContextShape

    runs = {}
    for extra in (True, False):
        model = LlamaModel(model_path, extra_buffers=extra)
        try:
            model.open_context(ContextShape(n_seq_max=1, kv_cells=512, n_batch=128, unified=False, n_threads=2))
            runs[extra] = [greedy_run(model, prompt, 12) for prompt in AGREEMENT_PROMPTS]
        finally:
            model.close()
    same = sum(a[0] == b[0] for a, b in zip(runs[True], runs[False]))
    assert same >= len(AGREEMENT_PROMPTS) - 2, f"{same} of {len(AGREEMENT_PROMPTS)} prompts agree"
    gaps = [
        abs(x - y)
        for (tokens_a, lp_a), (tokens_b, lp_b) in zip(runs[True], runs[False])
        for ta, tb, x, y in zip(tokens_a, tokens_b, lp_a, lp_b)
        if ta == tb
    ]
    assert max(gaps) < 0.25 and sum(gaps) / len(gaps) < 0.05, f"log-prob gaps: max {max(gaps):.3f}"


# -- the patch -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdist_source(tmp_path_factory) -> Path:
    """The vendored llama.cpp of the pinned release, as the build compiled it (the sdist the install cached)."""
    version = llama_build.pinned_version()
    sdist = llama_build.cache_root() / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        pytest.skip(f"no {sdist}: this environment's llama.cpp was not built here (a cached wheel was reused)")
    scratch = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if "/vendor/llama.cpp/ggml/" in m.name]
        archive.extractall(scratch, members=members, filter="data")
    return scratch / f"llama_cpp_python-{version}"


def stack_offset(operand: str) -> int:
    """0xc0 for "0xc0(%rsp)"."""
    return int(operand.strip().split("(")[0] or "0", 16)


def tile_config_stores(source: Path, tmp_path: Path) -> int:
    """Compile mmq.cpp for an AMX CPU as the build does (-O3, PIC) and count the stores into the tile
    configuration between its zeroing and the ldtilecfg that loads it."""
    ggml = source / "vendor/llama.cpp/ggml"
    obj = tmp_path / "mmq.o"
    subprocess.run(
        ["c++", "-std=c++17", "-O3", "-DNDEBUG", "-fPIC", "-march=sapphirerapids", f"-I{ggml}/include",
         f"-I{ggml}/src", f"-I{ggml}/src/ggml-cpu", f"-I{ggml}/src/ggml-cpu/amx", "-c", str(source / MMQ), "-o", str(obj)],
        check=True, capture_output=True,
    )
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)], capture_output=True, text=True, check=True)
    lines = listing.stdout.splitlines()
    load = next(i for i, line in enumerate(lines) if "ldtilecfg" in line)
    base = stack_offset(lines[load].split("ldtilecfg")[1])
    stores = 0
    for line in reversed(lines[max(0, load - 16) : load]):  # back to the branch that skips an initialised thread
        if any(word in line for word in ("call", "jmp", "jne", "je ", "ret")):
            break
        target = line.rsplit(",", 1)[-1]
        if target.strip().endswith("(%rsp)") and base < stack_offset(target) < base + 64:  # past the palette byte
            stores += 1
    return stores


@pytest.mark.skipif(not (shutil.which("c++") and shutil.which("objdump")), reason="needs a C++ compiler and objdump")
def test_the_patch_keeps_the_tile_configuration_the_compiler_dropped(sdist_source, tmp_path):
    """Without the fix, GCC drops the stores of the tiles' rows and columns (only the palette is written), and
    the first tile instruction faults; with it, they are written before ldtilecfg reads them."""
    original = tile_config_stores(sdist_source, tmp_path)
    for patch in llama_build.PATCHES:
        subprocess.run(["patch", "-p1", "--forward", "--batch", "--quiet", "-i", str(patch)], cwd=sdist_source, check=True)
    patched = tile_config_stores(sdist_source, tmp_path)
    assert patched >= 2, f"{patched} stores of rows/columns before ldtilecfg"  # colsb[0..7], rows[0..7]
    assert original < patched, f"unpatched {original} stores, patched {patched}: the check no longer sees the bug"
