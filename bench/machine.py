"""What a benchmark ran on: the CPU and the llama.cpp build, printed first and saved with the figures.

Machines here differ in CPU (some have AVX-512 and AMX, some not), and a figure from one is no baseline for
another: every run names both.
"""

from __future__ import annotations

import os
import re
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import llama_cpp


def cpu_model() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    match = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def cpu_amx() -> list[str]:
    try:
        flags = re.search(r"^flags\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        flags = None
    return sorted(flag for flag in (flags.group(1).split() if flags else []) if flag.startswith("amx"))


def machine() -> dict:
    try:
        bindings = version("llama_cpp_python")
    except PackageNotFoundError:
        bindings = "unknown"
    return {
        "cpu": cpu_model(),
        "cpu_amx": cpu_amx(),
        "cores": os.cpu_count(),
        "llama_cpp_python": bindings,  # servelet's builds carry their variant and cache key: 0.3.36+amx.k...
        "llama_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }


def describe(facts: dict) -> str:
    amx = ", ".join(facts["cpu_amx"]) or "no AMX"
    return (f"CPU: {facts['cpu']} ({facts['cores']} cores; {amx})\n"
            f"llama-cpp-python {facts['llama_cpp_python']}: {facts['llama_system_info']}")
