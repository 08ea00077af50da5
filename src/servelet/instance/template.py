"""A snapshot template: one process per model that has done every part of an instance's start its instances share
(the imports, the weights, a llama.cpp context with no token in it) and then forks instances on request (a zygote).

The gateway opens one connection to the template's Unix socket per instance and sends one JSON line:

    {"name": NAME, "socket": PATH, "log": FIFO, "env": {...}, "gateway_pid": PID}

The template forks. The child becomes the instance: its output goes into FIFO, its environment gets `env` (its share
of the cores), it serves on PATH. The template answers `{"pid": N}` on that connection, then `{"status": S}` (the
wait status) when it reaps the child, and closes it: how the gateway learns that an instance crashed.

A fork copies only the thread that calls it, so the template runs one thread (it checks, before it listens) and has
computed nothing: llama.cpp makes its OpenMP team at the first decode, which happens in the instance, on its engine
thread. After the fork the instance makes itself unique: new random seeds, no socket or connection of the template's,
its own name, its own KV cells (the template's context is copy-on-write: nothing an instance writes is seen by the
template or a sibling).
"""

from __future__ import annotations

import json
import logging
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import NoReturn

from .. import heap
from ..runtimes import NotSnapshottable, Prepared, prepare_runtime
from ..settings import InstanceSettings, load_instance_settings
from .server import preload_web_stack, run_instance  # the instance's web stack: imported here, not per instance

log = logging.getLogger("servelet.template")

NOT_SNAPSHOTTABLE_EXIT = 3  # the gateway reads it as "start this model's instances cold": no retry
REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 1 << 20


def run_template(settings: InstanceSettings) -> int:
    """Prepare, then fork instances until stopped (SIGTERM, or the gateway's death: see the gateway's side)."""
    started = time.perf_counter()
    preload_web_stack()
    try:
        prepared = prepare_runtime(settings)
    except NotSnapshottable as exc:
        log.error("%s cannot be a snapshot template: %s", settings.model, exc)
        return NOT_SNAPSHOTTABLE_EXIT
    threads = running_threads()
    if len(threads) > 1:
        log.error(
            "%s cannot be a snapshot template: %d threads run after preparing it (%s), and a fork carries only the "
            "thread that calls it", settings.model, len(threads), ", ".join(threads),
        )
        return NOT_SNAPSHOTTABLE_EXIT
    heap.settle()  # before any fork: the children share the template's frozen pages, and never walk them
    listener = listen(settings.socket)
    what = "its runtime imported" if prepared.state is None else "its model loaded and its context open"
    log.info("template of %s ready in %.2f s (%s runtime, %s)", settings.model, time.perf_counter() - started,
             prepared.kind, what)
    serve_forks(listener, prepared, settings)
    return 0


def running_threads() -> list[str]:
    """The names of this process's threads (from /proc: native ones too, which `threading` does not see)."""
    tasks = Path("/proc/self/task")
    return [(task / "comm").read_text().strip() for task in tasks.iterdir()] if tasks.is_dir() else []


def listen(path: Path) -> socket.socket:
    """Listen on `path`; the socket appears there only once it accepts (bound elsewhere, then renamed), so the
    gateway may take its existence for readiness."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(path.name + ".binding")
    for stale in (staging, path):
        stale.unlink(missing_ok=True)
    listener.bind(str(staging))
    os.chmod(staging, 0o600)
    listener.listen(64)
    os.replace(staging, path)
    return listener


def serve_forks(listener: socket.socket, prepared: Prepared, settings: InstanceSettings) -> None:
    """One thread: accept fork requests, and report each child's end on its request's connection."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd hears of each child's exit
    signal.set_wakeup_fd(wake_write)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "fork")
    selector.register(wake_read, selectors.EVENT_READ, "reap")
    children: dict[int, socket.socket] = {}  # pid -> the connection that asked for it
    while True:
        for key, _ in selector.select():
            if key.data == "reap":
                _drain(wake_read)
                _reap(children)
                continue
            connection, _ = listener.accept()
            try:
                request = _read_request(connection)
            except (OSError, ValueError) as exc:
                log.warning("a fork request could not be read: %s", exc)
                connection.close()
                continue
            try:
                output = _open_log(request["log"])
            except OSError as exc:
                log.warning("the log of instance %s could not be opened: %s", request["name"], exc)
                connection.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _become_instance(request, prepared, settings, output, [listener, connection, *children.values()],
                                 [wake_read, wake_write], selector)
            os.close(output)
            try:
                connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                children[pid] = connection
            except OSError:  # the gateway gave up on it: it must not run unknown to anyone
                os.kill(pid, signal.SIGKILL)
                connection.close()


def _open_log(path: str) -> int:
    """The write end of the FIFO the gateway reads the instance's log from, opened here, before the fork, so that
    the gateway's end sees end-of-file exactly when the instance (its only writer) ends. Non-blocking to open (the
    gateway must be reading already), blocking to write (a busy gateway slows the instance's logging, loses none)."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return fd


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _read_request(connection: socket.socket) -> dict:
    connection.settimeout(REQUEST_TIMEOUT_S)
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk or len(data) > MAX_REQUEST_BYTES:
            raise ValueError("the request ended before its end of line")
        data += chunk
    connection.settimeout(None)
    request = json.loads(data)
    missing = {"name", "socket", "log", "env", "gateway_pid"} - set(request)
    if missing:
        raise ValueError(f"the request lacks {', '.join(sorted(missing))}")
    return request


def _reap(children: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = children.pop(pid, None)
        if connection is not None:
            try:
                connection.sendall(json.dumps({"status": status}).encode() + b"\n")
            except OSError:
                pass  # the gateway stopped listening (it is closing)
            connection.close()


def _become_instance(
    request: dict, prepared: Prepared, settings: InstanceSettings, output: int, sockets: list[socket.socket],
    fds: list[int], selector: selectors.BaseSelector,
) -> NoReturn:
    """In the child: drop what is the template's, make this process unique, and serve as an instance."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        selector.close()
        for each in sockets:
            each.close()
        for fd in fds:
            os.close(fd)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        os.environ.update(request["env"])
        reseed()
        exit_with(int(request["gateway_pid"]))
        instance = load_instance_settings(model=settings.model, socket=Path(request["socket"]))
        log.info("instance %s forked from the template of %s (pid %d)", request["name"], settings.model, os.getpid())
        code = run_instance(instance, prepared)
    except BaseException:  # noqa: BLE001 - whatever happens, the child must never return into the template's loop
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def reseed() -> None:
    """New seeds for every random generator the instance may sample with. Python's `random` reseeds itself in a
    forked child; NumPy's and PyTorch's global generators do not (seeded only where imported: an import of
    numpy.random here would cost an instance 22 ms). llama.cpp's samplers take a seed from os.urandom per
    request: unique already."""
    if (numpy_random := sys.modules.get("numpy.random")) is not None:  # not imported: nothing drew from it
        numpy_random.seed(int.from_bytes(os.urandom(4), "little"))
    if (torch := sys.modules.get("torch")) is not None:
        torch.seed()


def exit_with(gateway_pid: int) -> None:
    """SIGTERM this instance when the gateway ends. Its parent is the template, not the gateway, so the kernel's
    parent-death signal would end it with the template instead; a pidfd watches the gateway itself."""
    try:
        gateway = os.pidfd_open(gateway_pid)
    except ProcessLookupError:
        os._exit(1)

    def watch() -> None:
        select.select([gateway], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="servelet-gateway-watch", daemon=True).start()
