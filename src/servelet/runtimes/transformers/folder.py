"""What a Hugging Face model folder holds: its task, and how to load its weights on this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...settings import InstanceSettings, SettingsError

TASKS = ("question-answering", "feature-extraction", "text-classification", "text-generation")
# Names users bring from other servers (SageMaker's Hugging Face container, transformers' pipelines).
TASK_ALIASES = {"embeddings": "feature-extraction", "sentiment-analysis": "text-classification"}
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json")
TORCH_DTYPES = {
    "fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}


def task_of(path: Path, settings: InstanceSettings) -> str:
    """The setting, else the architecture config.json names; a folder we cannot place asks for SERVELET_TASK."""
    if settings.task:
        task = TASK_ALIASES.get(settings.task.strip().lower(), settings.task.strip().lower())
        if task not in TASKS:
            raise SettingsError(
                f"SERVELET_TASK / HF_TASK: '{settings.task}' is not a task the transformers runtime serves "
                f"(accepted: {', '.join(TASKS)})"
            )
        return task
    if any((path / name).is_file() for name in SENTENCE_TRANSFORMERS_FILES):
        return "feature-extraction"
    architectures = read_config(path).get("architectures") or []
    for architecture in architectures:
        if architecture.endswith("ForQuestionAnswering"):
            return "question-answering"
        if architecture.endswith("ForSequenceClassification"):
            return "text-classification"
        if architecture.endswith(("ForCausalLM", "LMHeadModel")):
            return "text-generation"
        if architecture.endswith("Model"):  # a bare encoder (BertModel): its pooled hidden states are embeddings
            return "feature-extraction"
    raise SettingsError(
        f"{path.name}: cannot tell the task from config.json (architectures: {architectures or 'none'}); "
        f"set SERVELET_TASK to one of {', '.join(TASKS)}"
    )


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{path.name}: config.json cannot be read: {exc}") from None


def prepare_torch(settings: InstanceSettings) -> None:
    """Offline, quiet, and on the instance's share of the cores; called before any weights load."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model folder is complete: never reach a hub from an instance
    import torch
    import transformers

    torch.set_num_threads(settings.threads)
    transformers.utils.logging.disable_progress_bar()


def load_model(auto_class, path: Path, settings: InstanceSettings):
    """The weights through a transformers Auto class, local files only, ready for inference.

    dtype auto keeps the checkpoint's own type, except float16, which runs as float32: CPU kernels for float16
    are slow or missing."""
    import torch
    import transformers

    # transformers 4.x names the option torch_dtype; 5.x renamed it dtype.
    dtype_option = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = auto_class.from_pretrained(path, local_files_only=True, **{dtype_option: TORCH_DTYPES.get(settings.dtype, "auto")})
    if settings.dtype == "auto" and model.dtype == torch.float16:
        model = model.float()
    return model.eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)
