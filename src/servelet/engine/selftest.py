"""A few tokens of a GGUF model through the engine's own llama.cpp calls, for a subprocess to run.

A llama.cpp build that does not fit the CPU (AMX tiles without the fix, instructions the CPU lacks) dies by a
signal at its first decode. Run here, in a child process, it takes down only the child, and the parent (the
installer, the test run) can say what happened and what to do.

    python -m servelet.engine.selftest [MODEL]      # MODEL: a path or model URI; default: the default model

Prints the build's system info first (on stderr, so it survives a crash), then one JSON line with the greedy
continuations and the build's facts.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

PROMPTS = (
    # Long enough that the prompt's matrix products take AMX's tile path (more than one row), then single rows.
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Germany is",
    "Water boils at one hundred degrees Celsius and freezes at",
)
NEW_TOKENS = 4


def run(model_uri: str) -> dict:
    import llama_cpp

    from ..artifacts import resolve_model
    from .llama import ContextShape, LlamaModel

    print(llama_cpp.llama_print_system_info().decode(errors="replace").strip(), file=sys.stderr, flush=True)
    model = LlamaModel(resolve_model(model_uri))
    try:
        model.open_context(ContextShape(n_seq_max=len(PROMPTS), kv_cells=512 * len(PROMPTS), n_batch=256,
                                        unified=False, n_threads=os.cpu_count() or 1))
        prompts = [model.tokenize(text) for text in PROMPTS]
        outputs: list[list[int]] = [[] for _ in PROMPTS]
        for step in range(NEW_TOKENS):
            model.batch.clear()
            for seq_id, prompt in enumerate(prompts):
                if step == 0:
                    model.batch.add(prompt, 0, seq_id, want_last_logits=True)
                else:
                    model.batch.add([outputs[seq_id][-1]], len(prompt) + step - 1, seq_id, want_last_logits=True)
            if model.decode() != 0:
                raise RuntimeError("llama_decode found no KV cells for a two-sequence test batch")
            for seq_id, token in enumerate(np.argmax(model.logits_rows(len(prompts)), axis=1)):
                outputs[seq_id].append(int(token))
        texts = [b"".join(model.piece(t) for t in tokens).decode("utf-8", "replace") for tokens in outputs]
        return {"continuations": texts, "build": model.build.summary(), "amx_weights_mib": model.build.amx_weights_mib}
    finally:
        model.close()


def main() -> None:
    from ..settings import DEFAULT_MODEL_URI

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL_URI)), flush=True)


if __name__ == "__main__":
    main()
