"""Environment names that change how a model's processes load code, refused where the control API takes them.

A model's `Environment` is merged into its instances' environment, and a transform job's into its instances' too.
Without this check, creating a model would also be a way to run any code as servelet's user (`LD_PRELOAD`,
`PYTHONSTARTUP`, a pip install), so an administrator must allow it (docs/security.md).
"""

from __future__ import annotations

from ..errors import ResourceInvalid

ALLOW_SETTING = "SERVELET_ALLOW_LOADER_ENVIRONMENT"
# The dynamic loader (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT), the interpreter (PYTHONPATH, PYTHONSTARTUP,
# PYTHONHOME, PYTHONUSERBASE, ...) and pip (PIP_INDEX_URL, PIP_CONFIG_FILE: what an install fetches).
LOADER_PREFIXES = ("LD_", "PYTHON", "PIP_")
LOADER_NAMES = frozenset({
    "SERVELET_INSTALL_REQUIREMENTS",  # pip-installs a handler's requirements.txt at load
    "GCONV_PATH",  # glibc loads character-set converters from there
    "OPENSSL_CONF", "OPENSSL_ENGINES", "OPENSSL_MODULES",  # OpenSSL loads engines and providers named there
})


def changes_loading(name: str) -> bool:
    # Upper-cased: servelet's own settings are read whatever their case.
    upper = name.upper()
    return upper in LOADER_NAMES or upper.startswith(LOADER_PREFIXES)


def refuse_loader_environment(environments: dict[str, object], allowed: bool) -> None:
    """`environments`: each environment as sent, by where it sits (`PrimaryContainer.Environment`). Raises
    ResourceInvalid naming the first name that changes how processes load, unless `allowed`."""
    if allowed:
        return
    for where, environment in environments.items():
        if not isinstance(environment, dict):
            continue  # not a map of names: the request's own validation says so
        for name in environment:
            if changes_loading(str(name)):
                raise ResourceInvalid(
                    f"{where}.{name}: environment names that change how the model's processes load code (LD_*, "
                    "PYTHON*, PIP_*, SERVELET_INSTALL_REQUIREMENTS, GCONV_PATH, OPENSSL_CONF, OPENSSL_ENGINES, "
                    f"OPENSSL_MODULES) are refused; an administrator can allow them with {ALLOW_SETTING}=true"
                )
