"""Environment names that change how a model's processes load code or where they read and write outside the model's
own files, refused where the control API takes them.

A model's `Environment` is merged into its instances' environment, and a transform job's into its instances' too.
Without this check, creating a model would also be a way to run any code as servelet's user (`LD_PRELOAD`,
`PYTHONSTARTUP`, a pip install, a vLLM plugin) or to read another model's files and the store (`HOME`,
`XDG_DATA_HOME`), so an administrator must allow it (docs/security.md).
"""

from __future__ import annotations

from ..errors import ResourceInvalid

ALLOW_SETTING = "SERVELET_ALLOW_LOADER_ENVIRONMENT"

# Prefixes refused, each with why.
LOADER_PREFIXES = {
    "LD_": "the dynamic loader (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT) loads libraries from there",
    "PYTHON": "the interpreter imports and runs code from there (PYTHONPATH, PYTHONSTARTUP, PYTHONHOME, ...)",
    "PIP_": "pip's index and config decide what an install fetches and runs",
    "XDG_": "the folders programs read config, data and caches from (servelet's store and artifact cache among them)",
}
# Names refused, each with why.
LOADER_NAMES = {
    "SERVELET_INSTALL_REQUIREMENTS": "pip-installs a handler's requirements.txt at load",
    "SERVELET_CACHE_DIR": "the artifact cache every model shares: an entry written there is loaded for another URI",
    "GCONV_PATH": "glibc loads character-set converters from there",
    "OPENSSL_CONF": "OpenSSL loads the engines and providers its config names",
    "OPENSSL_ENGINES": "OpenSSL loads engines from there",
    "OPENSSL_MODULES": "OpenSSL loads providers from there",
    "HOME": "~/.local's site-packages are imported, ~/.netrc and ~/.config are read, caches are written under it",
    "PATH": "the programs an instance runs (pip, a compiler for Triton or torch.compile) are found through it",
    "TMPDIR": "temporary files, and the compile caches torch and Triton load .so files from, go where it points",
    "TORCH_HOME": "torch.hub imports the code it finds under it",
    "TORCH_EXTENSIONS_DIR": "torch loads the compiled extensions it finds there",
    "TORCHINDUCTOR_CACHE_DIR": "torch.compile loads the compiled kernels it finds there",
    "TRITON_CACHE_DIR": "Triton loads the compiled kernels it finds there",
    "HF_HOME": "Hugging Face's token, caches and remote-code modules are read from under it",
    "HF_HUB_CACHE": "models are read from (and written to) that cache instead of the model's own files",
    "HUGGINGFACE_HUB_CACHE": "the old name of HF_HUB_CACHE",
    "HF_MODULES_CACHE": "transformers imports remote-code modules from there",
    "HF_ASSETS_CACHE": "a cache outside the model's own files",
    "HF_DATASETS_CACHE": "a cache outside the model's own files",
    "HF_TOKEN_PATH": "reads a token file from anywhere servelet's user can read",
    "HF_ENDPOINT": "models would be fetched from another hub than the one the administrator trusts",
    "TRANSFORMERS_CACHE": "the old name of HF_HUB_CACHE",
    "HF_DATASETS_TRUST_REMOTE_CODE": "runs a dataset repository's own Python code",
    "TRUST_REMOTE_CODE": "TGI's switch to run a model repository's own Python code",
    "AWS_CONFIG_FILE": "botocore runs the credential_process the config file names (the model's archive can hold one)",
    "AWS_SHARED_CREDENTIALS_FILE": "botocore reads credentials, and the commands that make them, from that file",
    "HF_TRUST_REMOTE_CODE": "runs a model repository's own Python code",
    "OPTION_TRUST_REMOTE_CODE": "LMI's switch to run a model repository's own Python code",
    "VLLM_PLUGINS": "chooses the plugins every vLLM process imports and runs",
    "VLLM_USE_MODELSCOPE": "models (and their code) would be fetched from ModelScope instead of the model's own files",
    "VLLM_CONFIG_ROOT": "vLLM reads its config files from there",
    "VLLM_CACHE_ROOT": "vLLM loads compiled graphs and kernels from that cache",
    "VLLM_ASSETS_CACHE": "a cache outside the model's own files",
    "VLLM_XLA_CACHE_PATH": "vLLM loads compiled XLA programs from there",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "lets vLLM unpickle messages, which runs code",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "lets a request load LoRA adapters from any path servelet's user can read",
    "VLLM_RPC_BASE_PATH": "vLLM's IPC sockets would go where it points",
    "VLLM_TORCH_PROFILER_DIR": "vLLM writes profiles where it points",
    "VLLM_RUST_FRONTEND_PATH": "vLLM runs the program found there",
}
# Names a normal model needs, kept on purpose (listed so that a reader does not add them above):
# OMP_NUM_THREADS and MKL_NUM_THREADS (threads), SAGEMAKER_* (the container contract's switches), HF_TASK and
# HF_MODEL_ID (what the model is), HF_TOKEN (the model's own hub token), HF_HUB_OFFLINE (only stops hub calls),
# OPTION_* other than the one above (LMI's engine options), VLLM_ATTENTION_BACKEND and other VLLM_* tuning.


def why_refused(name: str) -> str | None:
    """Why `name` may not be set by a model; None when it may. Upper-cased: servelet reads its own settings whatever
    their case."""
    upper = name.upper()
    if upper in LOADER_NAMES:
        return LOADER_NAMES[upper]
    return next((why for prefix, why in LOADER_PREFIXES.items() if upper.startswith(prefix)), None)


def refuse_loader_environment(environments: dict[str, object], allowed: bool) -> None:
    """`environments`: each environment as sent, by where it sits (`PrimaryContainer.Environment`). Raises
    ResourceInvalid naming the first name that changes how processes load, unless `allowed`."""
    if allowed:
        return
    for where, environment in environments.items():
        if not isinstance(environment, dict):
            continue  # not a map of names: the request's own validation says so
        for name in environment:
            if (why := why_refused(str(name))) is not None:
                raise ResourceInvalid(
                    f"{where}.{name}: {why}. Environment names that change how the model's processes load code or "
                    "where they read and write outside the model's files are refused (docs/security.md lists them); "
                    f"an administrator can allow them with {ALLOW_SETTING}=true"
                )
