#!/usr/bin/env python3
"""Build llama-cpp-python for the CPU it runs on, with servelet's AMX fix, install it, and self-test it.

pip keys its wheel cache on name and version only, so a native build made on one CPU would be reused on
another and die there with SIGILL. Wheels are kept instead in a cache of servelet's own, keyed by everything
that shapes the build: the release, the patches, the CMake arguments, the compiler and the instruction sets
`-march=native` turns on here. The key travels in the wheel's version (`0.3.36+amx.k1a2b3c4d5e6f`, which still
satisfies `==0.3.36`), so `pip list` and the engine's load log say which build runs.

The build uses AMX where the CPU has it and the kernel grants it; the installed build then decodes a few
tokens of the default model in a subprocess, and an AMX build that dies there falls back to the no-AMX build
by itself (and remembers, so the next install goes straight to it). `SERVELET_LLAMA_CPP_AMX=off` forces the
no-AMX build. A third variant, "stock" (the sdist unpatched, AMX off), is never installed here: it is the
llama-cpp-python users get, which bench/engine.py compares servelet against, cached here under its own key.

    python install/llama_build.py                 # for the Python running it: build or reuse, install, self-test
    python install/llama_build.py --no-self-test  # before servelet itself is installed
    python install/llama_build.py --show          # the choice and the cache key; nothing built

Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCHES = sorted((ROOT / "install" / "patches").glob("*.patch"))
DISTRIBUTION = "llama-cpp-python"
AMX_FLAGS = ("amx_tile", "amx_int8")
NO_AMX_COMPILE_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
OFF_WORDS = {"off", "0", "false", "no"}
SELF_TEST_SECONDS = 300
RECORD_NAME = "servelet-llama-build.json"  # in the target environment's prefix: what was installed and tested


@dataclass(frozen=True)
class Choice:
    variant: str  # "amx" or "noamx" ("stock", the benchmark's unpatched peer, is never chosen)
    why: str


@dataclass(frozen=True)
class Build:
    """One build's inputs; `key` hashes all of them."""

    version: str
    variant: str
    cmake_args: str
    patches: dict[str, str]  # file name -> sha256
    compiler: str
    native_flags: str

    @property
    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def wheel_version(self) -> str:
        return f"{self.version}+{self.variant}.k{self.key[:12]}"


# -- what this machine is ----------------------------------------------------------------------------------

def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else platform.processor() or "unknown"


def kernel_grants_amx() -> bool:
    """Ask Linux for the AMX tile-data permission, as ggml does before it uses tiles (arch_prctl)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


def choose(flags: set[str], setting: str | None, granted) -> Choice:
    """AMX when the CPU has it, the kernel grants it and nobody said off; `granted` is asked last."""
    if setting is not None and setting.strip().lower() in OFF_WORDS:
        return Choice("noamx", f"SERVELET_LLAMA_CPP_AMX={setting}")
    if not all(flag in flags for flag in AMX_FLAGS):
        return Choice("noamx", "this CPU has no AMX")
    if not granted():
        return Choice("noamx", "the kernel refuses AMX tile data to this process (arch_prctl)")
    return Choice("amx", "this CPU has AMX and the kernel grants it")


def native_flags(compiler: str) -> str:
    """The instruction-set options `-march=native` means here, as the compiler expands them."""
    probe = subprocess.run(
        [compiler, "-march=native", "-E", "-x", "c", os.devnull, "-###"], capture_output=True, text=True, check=True
    )
    cc1 = next((line for line in probe.stderr.splitlines() if Path(line.split()[0]).name == "cc1"), "")
    return " ".join(word.strip('"') for word in shlex.split(cc1) if word.startswith(("-march=", "-mtune=", "-m")))


def compiler_identity(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


def pinned_version() -> str:
    """The release pyproject.toml pins, so there is one place to change it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name, _, version = requirement.partition("==")
        if name.strip().lower().replace("_", "-") == DISTRIBUTION:
            return version.strip()
    raise SystemExit(f"pyproject.toml does not pin {DISTRIBUTION}==VERSION")


def describe(variant: str) -> Build:
    """One variant's inputs. "amx" and "noamx" are servelet's builds; "stock" is the sdist as its users build it
    (no patches) with AMX off, since stock AMX crashes: the peer bench/engine.py compares servelet against."""
    cc = os.environ.get("CC", "cc")
    cmake = ["-DGGML_NATIVE=ON"]
    if variant in ("noamx", "stock"):
        # Everything else native; gcc's explicit -mno-* win over what -march=native implies, in any order.
        cmake += [f"-DCMAKE_C_FLAGS={NO_AMX_COMPILE_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_COMPILE_FLAGS}"]
    return Build(
        version=pinned_version(),
        variant=variant,
        cmake_args=shlex.join(cmake),
        patches={} if variant == "stock" else {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in PATCHES},
        compiler=compiler_identity(cc),
        native_flags=native_flags(cc),
    )


# -- the cache -----------------------------------------------------------------------------------------------

def cache_root() -> Path:
    if configured := os.environ.get("SERVELET_BUILD_CACHE"):
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "servelet" / "llama-cpp"


def cached_wheel(build: Build) -> Path | None:
    folder = cache_root() / build.key
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    return wheels[0] if wheels else None


def crash_note(build: Build) -> Path:
    """Written when this build died in its self-test on this machine: the next install skips it."""
    return cache_root() / build.key / "self-test-crashed.txt"


def fetch_sdist(version: str) -> Path:
    folder = cache_root() / "sdist"
    found = sorted(folder.glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", DISTRIBUTION,
         f"{DISTRIBUTION}=={version}", "-d", str(folder)])
    found = sorted(folder.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise SystemExit(f"pip download left no llama_cpp_python-{version}.tar.gz in {folder}")
    return found[0]


def obtain(build: Build) -> Path:
    """The wheel of `build` from the cache, compiled first where no machine with its key built it yet."""
    wheel = cached_wheel(build)
    if wheel:
        say(f"reusing {wheel} (built on a machine with the same key)")
        return wheel
    return build_wheel(build)


def build_wheel(build: Build) -> Path:
    """Unpack the sdist, apply the build's patches, stamp the version with the key, compile, keep the wheel."""
    sdist = fetch_sdist(build.version)
    target = cache_root() / build.key
    with tempfile.TemporaryDirectory(prefix="servelet-llama-build-") as scratch:
        with tarfile.open(sdist) as archive:
            archive.extractall(scratch, filter="data")
        source = Path(scratch) / f"llama_cpp_python-{build.version}"
        for patch in (p for p in PATCHES if p.name in build.patches):
            say(f"applying {patch.relative_to(ROOT)}")
            run(["patch", "-p1", "--forward", "--batch", "--quiet", "-i", str(patch)], cwd=source)
        init = source / "llama_cpp" / "__init__.py"
        init.write_text(init.read_text().replace(f'"{build.version}"', f'"{build.wheel_version}"', 1))
        env = os.environ | {"CMAKE_ARGS": build.cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
        out = Path(scratch) / "wheel"
        say(f"compiling llama.cpp ({build.variant}; CMAKE_ARGS={build.cmake_args}): several minutes")
        started = time.monotonic()
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir", "-w", str(out), str(source)],
            env=env)
        wheel = next(out.glob("*.whl"))
        staged = Path(tempfile.mkdtemp(prefix=f".{build.key}.", dir=cache_root()))
        shutil.move(wheel, staged / wheel.name)
        (staged / "build.json").write_text(json.dumps(asdict(build) | {"key": build.key}, indent=2) + "\n")
        if target.exists():  # a half-written folder from an interrupted run, or a build that crashed
            shutil.rmtree(target)
        staged.rename(target)  # atomic: the cache never holds a half-written wheel
        say(f"built {wheel.name} in {time.monotonic() - started:.0f} s into {target}")
    return target / wheel.name


# -- the target environment ---------------------------------------------------------------------------------

def installed_version(python: str) -> str | None:
    probe = subprocess.run(
        [python, "-c", f"import importlib.metadata as m; print(m.version({DISTRIBUTION!r}))"],
        capture_output=True, text=True,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def record_path(python: str) -> Path:
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True)
    return Path(prefix.stdout.strip()) / RECORD_NAME


def read_record(python: str) -> dict:
    try:
        return json.loads(record_path(python).read_text())
    except (OSError, ValueError):
        return {}


def install(python: str, wheel: Path) -> None:
    say(f"installing {wheel.name}")
    run([python, "-m", "pip", "install", "--quiet", "--no-cache-dir", str(wheel)])


def self_test(python: str) -> subprocess.CompletedProcess | None:
    """A few tokens of the default model in a subprocess; None while servelet is not installed there."""
    probe = subprocess.run([python, "-c", "import servelet.engine.selftest"], capture_output=True)
    if probe.returncode != 0:
        return None
    return subprocess.run(
        [python, "-m", "servelet.engine.selftest"], capture_output=True, text=True, timeout=SELF_TEST_SECONDS
    )


def death(result: subprocess.CompletedProcess) -> str:
    if result.returncode < 0:
        return f"died by {signal.Signals(-result.returncode).name}"
    return f"exited with status {result.returncode}"


# -- the whole of it ----------------------------------------------------------------------------------------

def ensure(python: str, choice: Choice, run_self_test: bool) -> int:
    build = describe(choice.variant)
    if choice.variant == "amx" and crash_note(build).exists():
        say(f"the AMX build crashed in its self-test on this machine before ({crash_note(build)}); using the no-AMX build")
        choice = Choice("noamx", "the AMX build crashed here before")
        build = describe("noamx")
    say(f"llama.cpp build for this machine: {build.variant} ({choice.why}); CPU {cpu_model()}")
    say(f"cache key {build.key[:12]} = sha256 of: {DISTRIBUTION} {build.version}, patches {sorted(build.patches)}, "
        f"CMAKE_ARGS {build.cmake_args!r}, {build.compiler}, native flags {build.native_flags}")

    record = read_record(python)
    tested = record.get("version") == build.wheel_version and record.get("self_test") == "passed"
    if installed_version(python) == build.wheel_version and (tested or not run_self_test):
        say(f"{DISTRIBUTION} {build.wheel_version} is installed" + (" and passed its self-test" if run_self_test else ""))
        return 0

    wheel = obtain(build)
    install(python, wheel)
    record = {"version": build.wheel_version, "key": build.key, "variant": build.variant, "why": choice.why,
              "cpu": cpu_model(), "self_test": None}
    if run_self_test:
        result = self_test(python)
        if result is None:
            say("self-test deferred: servelet is not installed in this environment yet")
        elif result.returncode == 0:
            record["self_test"] = "passed"
            say(f"self-test passed: {result.stdout.strip()}")
        else:
            say(f"self-test of {build.wheel_version} {death(result)}:\n{tail(result)}", loud=True)
            if build.variant == "amx" and result.returncode < 0:  # a crash; an exception is no reason to drop AMX
                crash_note(build).write_text(f"{time.ctime()}: {death(result)}\n{tail(result)}\n")
                say("AMX does not run here: falling back to the no-AMX build (SERVELET_LLAMA_CPP_AMX=off forces it)",
                    loud=True)
                return ensure(python, Choice("noamx", f"the AMX build {death(result)} in its self-test"), run_self_test)
            say(f"the {build.variant} build does not run here: see the output above", loud=True)
            return 1
    record_path(python).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def tail(result: subprocess.CompletedProcess, lines: int = 20) -> str:
    return "\n".join((result.stdout + result.stderr).strip().splitlines()[-lines:])


def say(message: str, loud: bool = False) -> None:
    prefix = "servelet-build: " + ("*** " if loud else "")
    print(prefix + message.replace("\n", "\n" + prefix), file=sys.stderr if loud else sys.stdout, flush=True)


def run(command: list[str], **kwargs) -> None:
    subprocess.run(command, check=True, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the environment to install into (default: this one)")
    parser.add_argument("--no-self-test", action="store_true", help="install only (servelet is not installed yet)")
    parser.add_argument("--show", action="store_true", help="print the choice and the cache key, build nothing")
    args = parser.parse_args(argv)
    choice = choose(cpu_flags(), os.environ.get("SERVELET_LLAMA_CPP_AMX"), kernel_grants_amx)
    if args.show:
        build = describe(choice.variant)
        print(json.dumps({"choice": asdict(choice), "key": build.key, "wheel_version": build.wheel_version,
                          "cache": str(cache_root() / build.key), "cpu": cpu_model()} | asdict(build), indent=2))
        return 0
    return ensure(args.python, choice, run_self_test=not args.no_self_test)


if __name__ == "__main__":
    sys.exit(main())
