"""A user's `inference.py` under the SageMaker inference toolkit's contract, so an existing script runs unchanged.

The model folder (an unpacked model.tar.gz) holds `code/inference.py` (or `inference.py`) and optionally
`code/requirements.txt`. `model_fn(model_dir)` runs once at load; each request runs
`output_fn(predict_fn(input_fn(body, content_type), model), accept)`, or `transform_fn(model, body, content_type,
accept)` when the script defines it. What the script leaves out gets the toolkit's defaults (codecs.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

from starlette.responses import Response

from ..settings import InstanceSettings
from . import HANDLER_SCRIPTS
from . import codecs
from .base import Call, ClientGone, InvocationError, Runtime, run_in_worker

log = logging.getLogger("servelet.handler")

STEPS = ("input_fn", "predict_fn", "output_fn")
RETRY_AFTER_S = 1
# sys.path and sys.modules are one for the process: a multi-model instance loading two scripts at once must not let
# one find the other's `code/` first on sys.path and import its sibling modules.
IMPORTING = threading.Lock()


class HandlerError(RuntimeError):
    """The script cannot serve: it does not import, lacks model_fn, or mixes transform_fn with the steps."""


class HandlerRuntime(Runtime):
    name = "handler"

    def __init__(self, folder: Path, settings: InstanceSettings):
        self.folder = folder
        script = find_script(folder)
        prepare_requirements(script.parent / "requirements.txt", settings.install_requirements)
        self.code_dir = str(script.parent)
        self.script = import_script(script, self.code_dir)
        # The user's code runs SERVELET_HANDLER_WORKERS requests at once, as many workers as the toolkit would
        # run; up to SERVELET_MAX_WAITING more wait their turn, and past them a request is refused (429).
        self.workers = settings.handler_workers
        self.max_waiting = settings.max_waiting
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="handler")
        self.admitted = 0  # running or waiting
        self.cancelled = 0  # requests whose client left while they waited, dropped before the user's code ran
        try:
            self.model = self._load_model(script)
        except BaseException:
            self.close()
            raise

    def _load_model(self, script: Path):
        self.transform_fn = getattr(self.script, "transform_fn", None)
        mixed = [step for step in STEPS if hasattr(self.script, step)]
        if self.transform_fn and mixed:
            raise HandlerError(f"{script}: defines transform_fn and {', '.join(mixed)}; use transform_fn alone, or the steps")
        self.input_fn = getattr(self.script, "input_fn", default_input_fn)
        self.predict_fn = getattr(self.script, "predict_fn", default_predict_fn)
        self.output_fn = getattr(self.script, "output_fn", default_output_fn)
        model_fn = getattr(self.script, "model_fn", None)
        if model_fn is None:
            raise HandlerError(
                f"{script}: defines no model_fn(model_dir); the SageMaker inference toolkit needs one to load the "
                "model (return what predict_fn or transform_fn use)"
            )
        return model_fn(str(self.folder))

    async def invoke(self, call: Call) -> Response:
        if self.admitted >= self.workers + self.max_waiting:
            raise InvocationError(
                429, f"the model is busy: {self.workers} request(s) running and {self.max_waiting} waiting "
                "(SERVELET_HANDLER_WORKERS, SERVELET_MAX_WAITING); retry later", "overloaded", RETRY_AFTER_S,
            )
        self.admitted += 1
        try:  # a client that leaves while its request waits: the request never runs, and counts as cancelled
            body, content_type = await run_in_worker(self.pool, call, self.answer, call, self._release)
        except ClientGone as gone:
            if gone.freed:
                self.cancelled += 1
            raise InvocationError(499, "the client left before the answer", "unavailable") from None
        return Response(body, media_type=content_type)

    def _release(self) -> None:
        self.admitted -= 1

    def answer(self, call: Call) -> tuple[bytes, str]:
        """Run the script's steps on one request; its exceptions become ModelError with its message."""
        accept = call.accept if call.accept and call.accept.strip() != codecs.ANY else codecs.default_accept()
        try:
            if self.transform_fn:
                result = self.transform_fn(self.model, call.body, call.content_type, accept)
            else:
                data = self.input_fn(call.body, call.content_type)
                result = self.output_fn(self.predict_fn(data, self.model), accept)
            return as_body(result, accept)
        except InvocationError:
            raise
        except Exception as exc:
            log.exception("the handler %s failed", self.folder.name)
            raise InvocationError(500, f"{type(exc).__name__}: {exc}", "model_error") from None

    def facts(self) -> dict:
        return {"runtime": self.name, "task": None, "name": self.folder.name}

    def occupancy(self) -> dict:
        running = min(self.admitted, self.workers)
        return {"running": running, "waiting": self.admitted - running, "cancelled": self.cancelled}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        with IMPORTING:
            sys.modules.pop(self.script.__name__, None)
            if self.code_dir in sys.path:
                sys.path.remove(self.code_dir)


# -- the toolkit's defaults for what the script leaves out ------------------------------------------------------
def default_input_fn(body: bytes, content_type: str):
    return codecs.decode(body, content_type)


def default_predict_fn(data, model):
    """Call the model (a function, a torch module) or its `predict` (scikit-learn, XGBoost)."""
    if callable(model):
        return model(data)
    if callable(getattr(model, "predict", None)):
        return model.predict(data)
    raise HandlerError(f"the model is a {type(model).__name__}, neither callable nor with predict(); write a predict_fn")


def default_output_fn(prediction, accept: str) -> tuple[bytes, str]:
    return codecs.encode(prediction, accept)


def as_body(result, accept: str) -> tuple[bytes, str]:
    """What output_fn or transform_fn returned: bytes or str (sent as `accept`), or a (body, content_type) tuple."""
    content_type = accept
    if isinstance(result, tuple) and len(result) == 2:
        result, content_type = result
    if isinstance(result, str):
        result = result.encode()
    if not isinstance(result, (bytes, bytearray, memoryview)):
        raise HandlerError(f"output_fn returned a {type(result).__name__}; return bytes or str, or (body, content_type)")
    return bytes(result), content_type


# -- loading the script -----------------------------------------------------------------------------------------
def find_script(folder: Path) -> Path:
    for name in HANDLER_SCRIPTS:
        if (folder / name).is_file():
            return folder / name
    raise HandlerError(f"{folder}: no {' or '.join(HANDLER_SCRIPTS)} to serve")


def import_script(script: Path, code_dir: str) -> ModuleType:
    """Import the script under a name of its own, with its folder on sys.path so its sibling imports work.

    The siblings it imported leave `sys.modules` afterwards (the script keeps them): in a multi-model instance
    another model's `code/utils.py` must import its own file, not this one's."""
    name = "servelet_handler_" + hashlib.sha256(str(script.resolve()).encode()).hexdigest()[:16]
    with IMPORTING:
        before = set(sys.modules)
        sys.path.insert(0, code_dir)
        spec = importlib.util.spec_from_file_location(name, script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            sys.path.remove(code_dir)
            hint = ""
            if isinstance(exc, ImportError) and (script.parent / "requirements.txt").is_file():
                hint = " (is it in requirements.txt? SERVELET_INSTALL_REQUIREMENTS=true installs them at load)"
            raise HandlerError(f"{script} does not import: {type(exc).__name__}: {exc}{hint}") from exc
        finally:  # a script that failed halfway leaves no sibling behind for the next model to import either
            for added in set(sys.modules) - before - {name}:
                if str(getattr(sys.modules[added], "__file__", None) or "").startswith(code_dir + "/"):
                    del sys.modules[added]
    return module


def prepare_requirements(requirements: Path, install: bool) -> None:
    """Install the script's requirements with pip, as SageMaker's containers do, only when the user asked:
    installing into the environment servelet itself runs in can change its own packages."""
    if not requirements.is_file():
        return
    listed = [line for line in requirements.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not listed:
        return
    if not install:
        log.warning(
            "%s lists %d requirement(s) that servelet does not install; install them into this environment, or set "
            "SERVELET_INSTALL_REQUIREMENTS=true to pip-install them at load", requirements, len(listed),
        )
        return
    from ..artifacts import cache_dir

    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / "pip.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # instances starting together must not run pip on one environment at once
        log.info("installing %s with pip", requirements)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-r", str(requirements)],
            capture_output=True, text=True,
        )
    if done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        raise HandlerError(f"pip install -r {requirements} failed: {' '.join(why)}")


def load(path: Path, settings: InstanceSettings) -> HandlerRuntime:
    return HandlerRuntime(path, settings)
