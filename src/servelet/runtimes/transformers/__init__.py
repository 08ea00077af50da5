"""Hugging Face model folders on PyTorch (CPU): question answering, embeddings, classification, text generation.

The task is the setting `SERVELET_TASK` (`HF_TASK`), else what the folder's config.json says (see `folder.py`).
Each task is one module; only the one the model needs is imported. This package shares its name with the
`transformers` library: its modules import the library absolutely (`import transformers`), never relatively.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from ...settings import InstanceSettings
from ..base import Runtime
from .folder import prepare_torch, task_of

# task → (module, runtime class)
TASK_RUNTIMES = {
    "question-answering": ("question_answering", "QuestionAnsweringRuntime"),
    "feature-extraction": ("embeddings", "EmbeddingRuntime"),
    "text-classification": ("classification", "ClassificationRuntime"),
    "text-generation": ("generation", "GenerationRuntime"),
}


def load(path: Path, settings: InstanceSettings) -> Runtime:
    task = task_of(path, settings)
    prepare_torch(settings)
    module_name, class_name = TASK_RUNTIMES[task]
    return getattr(import_module(f".{module_name}", __name__), class_name)(path, settings)
