"""A ready instance that stops answering, or whose engine is gone, is taken out of service and replaced.

Hung: a handler model whose process stops itself (SIGSTOP) when a file appears. A stopped process accepts
connections and answers nothing, which is what a hang looks like to the gateway: its health check (/ping within
SERVELET_HEALTH_CHECK_TIMEOUT, SERVELET_HEALTH_CHECK_FAILURES misses in a row) takes it out, and invocations work
again on its replacement. Broken: an engine thread that died makes the instance's /ping answer 503 (tested on the
instance app in process: nothing outside the process can end that thread), which the same health check counts.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, ReadTimeoutError
from starlette.testclient import TestClient

from conftest import boto, start_gateway, stop_process, wait_for
from servelet.instance import app as instance_app
from servelet.settings import InstanceSettings

HANGING = '''
import os, signal, threading, time

TRIGGER = {trigger!r}

def model_fn(model_dir):
    def stop_when_asked():
        while True:
            if os.path.exists(TRIGGER):
                os.unlink(TRIGGER)  # its replacement must not stop too
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(0.05)
    threading.Thread(target=stop_when_asked, daemon=True).start()
    return None

def transform_fn(model, body, content_type, accept):
    return str(os.getpid()), "text/plain"
'''
REPLACED_WITHIN_S = 30


def process_state(pid: int) -> str | None:
    """The kernel's state letter for the process (T: stopped), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def test_a_hung_instance_is_replaced_and_invocations_work_again(tmp_path):
    trigger = tmp_path / "hang-now"
    model = tmp_path / "hanging"
    (model / "code").mkdir(parents=True)
    (model / "code" / "inference.py").write_text(textwrap.dedent(HANGING.format(trigger=str(trigger))))
    gateway = start_gateway(
        tmp_path / "gateway", args=["--model", str(model)],
        env={"SERVELET_HEALTH_CHECK_TIMEOUT": "1", "SERVELET_HEALTH_CHECK_FAILURES": "2"},
    )
    try:
        runtime = boto("sagemaker-runtime", gateway.base_url, read_timeout=5, retries={"max_attempts": 0})

        def invoke() -> int | None:
            try:
                answer = runtime.invoke_endpoint(EndpointName="default", Body=b"{}", ContentType="application/json")
            except (ClientError, ReadTimeoutError):
                return None
            return int(answer["Body"].read())

        hung = invoke()
        assert hung is not None
        trigger.touch()
        assert wait_for(lambda: process_state(hung) == "T", 10), "the instance did not stop itself"

        began = time.monotonic()
        assert wait_for(lambda: (pid := invoke()) is not None and pid != hung, REPLACED_WITHIN_S, poll=0.5), (
            f"no replacement answered within {REPLACED_WITHIN_S} s:\n{gateway.log()[-3000:]}"
        )
        print(f"replaced and answering {time.monotonic() - began:.1f} s after the instance stopped")
        assert process_state(hung) is None  # killed, not left stopped beside its replacement
        assert "failed its health check 2 times in a row" in gateway.log()
    finally:
        stop_process(gateway.process)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # its death is the point
def test_an_instance_whose_engine_thread_died_answers_ping_503(model_path, monkeypatch):
    loaded = {}
    load = instance_app.load_runtime
    monkeypatch.setattr(instance_app, "load_runtime", lambda *args: loaded.setdefault("runtime", load(*args)))
    settings = InstanceSettings(model=str(model_path), max_batch_size=2, max_model_len=256, threads=2)
    with TestClient(instance_app.create_app(settings)) as http:
        assert wait_for(lambda: http.get("/ping").status_code == 200, 60)
        engine = loaded["runtime"].engine

        def broken() -> bool:
            raise RuntimeError("simulated: the engine thread ends outside a step")

        engine.scheduler.has_work = broken  # a mock of our own code, to end the engine thread on purpose
        with engine._wake:
            engine._wake.notify()
        assert wait_for(lambda: not engine._thread.is_alive(), 10)

        ping = http.get("/ping")
        assert ping.status_code == 503
        assert ping.json() == {"status": "failed", "error": "the engine thread is no longer running"}
        invoked = http.post("/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
        assert invoked.status_code == 503 and "no longer running" in invoked.text  # not a hang

