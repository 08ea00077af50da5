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
llama_build = sys.modules["llama_build"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
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


def test_the_stock_build_is_the_sdist_unpatched_with_amx_off():
    """The benchmark's peer: what `pip install llama-cpp-python` gives, minus the AMX crash, under a key of its own."""
    stock, noamx = llama_build.describe("stock"), llama_build.describe("noamx")
    assert stock.patches == {} and noamx.patches
    assert stock.cmake_args == noamx.cmake_args and llama_build.NO_AMX_COMPILE_FLAGS in stock.cmake_args
    assert stock.key != noamx.key
    assert stock.wheel_version == f"{stock.version}+stock.k{stock.key[:12]}"


def test_a_build_applies_its_own_patches_only(tmp_path, monkeypatch):
    """servelet's builds compile the sdist with install/patches/, the stock build compiles it as it comes."""
    monkeypatch.setenv("SERVELET_BUILD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()  # fetch_sdist made it
    version = llama_build.pinned_version()
    init = tmp_path / "__init__.py"
    init.write_text(f'__version__ = "{version}"\n')
    sdist = tmp_path / f"llama_cpp_python-{version}.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(init, f"llama_cpp_python-{version}/llama_cpp/__init__.py")
    monkeypatch.setattr(llama_build, "fetch_sdist", lambda _version: sdist)
    seen = {"patches": 0}

    def run(command, **_kwargs):  # stands in for patch and pip wheel
        if command[0] == "patch":
            seen["patches"] += 1
        else:
            seen["init"] = (Path(command[-1]) / "llama_cpp" / "__init__.py").read_text()
            out = Path(command[command.index("-w") + 1])
            out.mkdir()
            (out / "llama_cpp_python-0-py3-none-any.whl").touch()

    monkeypatch.setattr(llama_build, "run", run)
    for variant, patches in (("noamx", len(llama_build.PATCHES)), ("stock", 0)):
        seen["patches"] = 0
        build = llama_build.describe(variant)
        assert llama_build.build_wheel(build).parent.name == build.key
        assert seen["patches"] == patches and build.wheel_version in seen["init"]


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


def forced_run(model: LlamaModel, prompt: str, continuation: list[int] | None, new_tokens: int) -> list[dict]:
    """One sequence alone; each step feeds `continuation`'s token (greedy when None) and notes what the model
    thought of it: its log-probability, the model's own pick and the margin of that pick over the runner-up."""
    tokens = model.tokenize(prompt)
    steps = []
    model.batch.clear()
    model.batch.add(tokens, 0, 0, want_last_logits=True)
    for i in range(new_tokens):
        assert model.decode() == 0
        row = model.logits_rows(1)[0].astype(np.float64)
        logprobs = row - row.max() - np.log(np.exp(row - row.max()).sum())
        pick = int(logprobs.argmax())
        fed = pick if continuation is None else continuation[i]
        runner_up = np.partition(logprobs, -2)[-2]
        steps.append({"fed": fed, "logprob": float(logprobs[fed]), "pick": pick, "margin": float(logprobs[pick] - runner_up)})
        model.batch.clear()
        model.batch.add([fed], len(tokens) + i, 0, want_last_logits=True)
    model.forget(0)
    return steps


AGREEMENT_PROMPTS = (
    "The capital of France is",
    "Water is made of hydrogen and",
    "The first person to walk on the Moon was",
    "Photosynthesis is the process by which plants",
    "The largest ocean on Earth is the",
    "In 1492, Christopher Columbus",
)
NEAR_TIE = 0.3  # nats between the top two tokens: below it, a kernel's rounding may pick either


def test_the_amx_or_repacked_kernels_answer_as_the_plain_kernels_do_within_rounding(model_path):
    """With AMX on, the weights sit in AMX tiles (elsewhere, in the CPU's repacked layouts); without extra buffers
    the same build runs ggml's plain kernels, as a build without AMX does.

    Kernels round differently, so greedy texts may part at a near-tie and then go their own fluent ways
    (docs/engine.md). So both read the same text, the plain kernels' greedy answer, token by token: every token's
    log-probability must be close, and both must pick the same token wherever the pick is not a near-tie."""
    from servelet.engine.llama import ContextShape

    def load(extra: bool) -> LlamaModel:
        model = LlamaModel(model_path, extra_buffers=extra)
        model.open_context(ContextShape(n_seq_max=1, kv_cells=512, n_batch=128, unified=False, n_threads=2))
        return model

    plain, fast = load(False), load(True)
    try:
        reference = [forced_run(plain, prompt, None, 12) for prompt in AGREEMENT_PROMPTS]
        compared = [forced_run(fast, prompt, [step["fed"] for step in ref], 12)
                    for prompt, ref in zip(AGREEMENT_PROMPTS, reference)]
    finally:
        plain.close()
        fast.close()
    pairs = [(r, c) for ref, cmp in zip(reference, compared) for r, c in zip(ref, cmp)]
    gaps = [abs(r["logprob"] - c["logprob"]) for r, c in pairs]
    # Measured on an AVX-512 CPU (repacked against plain kernels, 72 tokens): max 0.23 nats, mean 0.042; a broken
    # kernel is off by whole nats.
    assert max(gaps) < 0.5 and sum(gaps) / len(gaps) < 0.1, f"log-prob gaps: max {max(gaps):.3f}, mean {sum(gaps) / len(gaps):.3f}"
    clear = [(r, c) for r, c in pairs if r["margin"] > NEAR_TIE]
    assert len(clear) > len(pairs) / 2
    assert all(r["pick"] == c["pick"] for r, c in clear), [(r, c) for r, c in clear if r["pick"] != c["pick"]]


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
