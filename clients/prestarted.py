"""Prestarted ClientApp processes: a message's ClientApp starts with Flower already imported.

Flower 1.42's SuperExec starts a fresh ``flwr-clientapp`` process for every message
(``SubprocessExecutor``), and importing Flower in it costs about a second on 2 cores, on
every message. Flower's own remedy, warm executors, exists only for its Kubernetes
executor and for agent, model and connector tasks
(``flwr/supercore/superexec/executor/warm_executor_pool.py``), and each of its prestarted
workers serves one task and exits (``flwr/supercore/task_worker.py``): in Flower 1.42 no
ClientApp process outlives its message, so a model that must stay loaded lives in a model
holder (``clients/model_holder.py``).

This module applies Flower's prestarted-worker pattern to ClientApps on a local SuperExec.
``PrestartedClientApps`` keeps one worker started: a process that has imported Flower's
ClientApp runtime and waits on a private Unix socket (Flower's ``task_worker`` protocol).
When the SuperExec launches a ClientApp, the executor hands the invocation (token and
Runtime API address) to that worker and starts the next one, while the message runs. A
launch that finds no worker ready (the first message, or two at once) starts
``flwr-clientapp`` as Flower does. Each message still runs in a process of its own, with
the state Flower gives it.

``elora-fed supernode`` (``clients/supernode.py``) starts its SuperExec through
``run_superexec`` unless given ``--no-prestart``.

    python -m clients.prestarted superexec FLOWER_SUPEREXEC_ARGS...   # what elora-fed supernode starts
    python -m clients.prestarted serve --socket PATH --parent-pid PID  # one worker (the executor starts it)
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BufferedIOBase
from logging import INFO, WARNING
from pathlib import Path
from types import ModuleType
from typing import Any

from flwr.supercore import log, task_worker
from flwr.supercore import task_worker_protocol as protocol
from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult
from flwr.supercore.typing import JSONObject

from clients.supernode import OBJECT_RETRY_ENV, retrying_after
from elora_fed.errors import EloraFedError

TASK_NAME = "ClientApp"
READY_TIMEOUT_S = 5.0  # how long a launch waits for a worker to accept before starting flwr-clientapp


class SuperExecVersionError(EloraFedError):
    """The installed Flower's SuperExec is not the one the prestarted ClientApps were written for."""


@dataclass(frozen=True)
class Invocation:
    """One ClientApp task handed to a worker: what ``flwr-clientapp`` gets on its command line."""

    token: str
    runtime_api_address: str
    insecure: bool
    root_certificates_path: str | None

    @classmethod
    def from_payload(cls, payload: object) -> Invocation:
        return cls(*task_worker.parse_invocation_payload(payload, TASK_NAME))


@dataclass
class Worker:
    """A started worker process and the socket it serves its one task on."""

    process: subprocess.Popen[bytes]
    socket_path: Path

    def ready(self) -> bool:
        return self.process.poll() is None and _ready_file(self.socket_path).exists()


def _ready_file(socket_path: Path) -> Path:
    """Where a worker says it is waiting (Flower's task_worker writes it, then removes it once busy)."""
    return socket_path.with_suffix(".ready")


def serve(socket_path: Path, parent_pid: int) -> int:
    """One worker: import Flower's ClientApp runtime, then run the one task handed over ``socket_path``."""
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supernode.runtime import run_clientapp as runtime

    start_parent_process_monitor(parent_pid)  # an idle worker ends with its SuperExec
    retry_objects_soon(runtime)

    def run_once(
        address: str, token: str, insecure: bool, certificates: bytes | None, started: Callable[[], None]
    ) -> int:
        started()
        runtime.run_clientapp(address, token, insecure, certificates, parent_pid=parent_pid)  # ends in SystemExit
        return 0

    return task_worker.serve_prestarted_worker(
        socket_path,
        _ready_file(socket_path),
        socket_path.with_suffix(".busy"),
        run_once,
        Invocation.from_payload,
        TASK_NAME,
    )


def retry_objects_soon(runtime: ModuleType) -> None:
    """Make the ClientApp runtime ``runtime`` retry its message's missing objects soon.

    The SuperNode announces a message to its SuperExec before it has pulled the message's
    objects from the SuperLink, so a ClientApp that starts at once, as a prestarted one
    does, finds some missing, and Flower's runtime retries them after 1 s. With
    ``OBJECT_RETRY_ENV`` set (``elora-fed supernode`` sets it to ``--reply-poll-s``), the
    first retry comes after that many seconds instead, doubling as Flower's do.
    """
    if OBJECT_RETRY_ENV in os.environ:
        pull = retrying_after(runtime.pull_and_inflate_object_from_tree, float(os.environ[OBJECT_RETRY_ENV]))
        setattr(runtime, "pull_and_inflate_object_from_tree", pull)  # noqa: B010 (a module attribute, set by name)


class PrestartedClientApps(SubprocessExecutor):
    """Flower's ``SubprocessExecutor``, with ClientApps handed to a worker started ahead of them."""

    def __init__(self) -> None:
        self._directory = Path(tempfile.mkdtemp(prefix="elora-fed-clientapps-"))
        self._started = 0
        self._next: Worker | None = None
        self._lock = threading.Lock()
        self._start_next()

    def _start_next(self) -> None:
        self._started += 1
        path = self._directory / f"worker-{self._started}.sock"
        command = [sys.executable, "-m", "clients.prestarted", "serve", "--socket", str(path)]
        self._next = Worker(subprocess.Popen([*command, "--parent-pid", str(os.getpid())]), path)

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        with self._lock:
            worker = self._next
            usable = spec.task_type == TaskType.CLIENT_APP and not spec.runtime_dependency_install
            if not usable or worker is None or not worker.ready():
                return super().launch(spec)  # as Flower does: a fresh flwr-clientapp process
            self._start_next()
        channel = _hand_over(worker, spec)
        if channel is None:
            return super().launch(spec)
        log(INFO, "ClientApp handed to prestarted %s", worker.socket_path.stem)
        threading.Thread(target=_relay, args=(channel, spec.suppress_output), daemon=True).start()
        return LaunchResult.accepted()

    def close(self) -> None:
        with self._lock:
            if self._next is not None and self._next.process.poll() is None:
                self._next.process.terminate()
            self._next = None
        shutil.rmtree(self._directory, ignore_errors=True)
        super().close()


def _hand_over(worker: Worker, spec: ExecutionSpec) -> BufferedIOBase | None:
    """Send ``spec``'s invocation to ``worker``; the channel once it accepted, None if it did not."""
    payload: JSONObject = {
        "token": spec.token,
        "runtime_api_address": spec.runtime_api_address,
        "insecure": spec.insecure,
        "root_certificates_path": spec.root_certificates_path,
    }
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(READY_TIMEOUT_S)
        connection.connect(str(worker.socket_path))
        channel = connection.makefile("rwb")
        protocol.send_message(channel, payload)
        if protocol.read_message(channel).get("event") != "accepted":
            raise OSError("the worker did not accept the task")
        connection.settimeout(None)
        return channel  # keeps the socket open until closed
    except (OSError, ValueError) as err:
        log(WARNING, "prestarted %s failed (%s); starting flwr-clientapp", worker.socket_path.stem, err)
        connection.close()
        return None


def _relay(channel: BufferedIOBase, quiet: bool) -> None:
    """The task's output to this process's, as a ``flwr-clientapp`` child's would be, until it finishes."""
    with channel:
        while True:
            try:
                event = protocol.read_message(channel)
            except (OSError, ValueError):
                return  # the worker exited; Flower's task heartbeat reports a task that died
            if event.get("event") == "output" and not quiet:
                stream = sys.stdout if event.get("stream") == "stdout" else sys.stderr
                stream.write(str(event.get("data", "")))
                stream.flush()
            elif event.get("event") != "output":
                return


def _require(module: ModuleType, name: str, what: str) -> None:
    if not hasattr(module, name):
        raise SuperExecVersionError(
            f"{module.__name__} has no {name}: this Flower's {what} is not Flower 1.42's; "
            "run elora-fed supernode --no-prestart"
        )


def run_superexec(argv: Sequence[str]) -> None:
    """``flower-superexec ARGV`` whose subprocess executor is ``PrestartedClientApps`` (blocks until it exits)."""
    module = importlib.import_module("flwr.supercore.superexec.run_superexec")
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    _require(module, "get_executor", "SuperExec")
    _require(runtime, "pull_and_inflate_object_from_tree", "ClientApp runtime")  # retry_objects_soon's
    from flwr.supercore.cli.flower_superexec import flower_superexec

    flower_get_executor = module.get_executor

    def get_executor(executor_type: Any, *args: Any, **kwargs: Any) -> Any:
        if executor_type == ExecutorType.SUBPROCESS:
            return PrestartedClientApps()
        return flower_get_executor(executor_type, *args, **kwargs)

    setattr(module, "get_executor", get_executor)  # noqa: B010 (a module attribute, set by name)
    sys.argv = ["flower-superexec", *argv]
    flower_superexec()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.prestarted", description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    worker = modes.add_parser("serve", help="one prestarted ClientApp worker")
    worker.add_argument("--socket", type=Path, required=True)
    worker.add_argument("--parent-pid", type=int, required=True)
    modes.add_parser("superexec", help="flower-superexec with prestarted ClientApps; its arguments follow")
    args, rest = parser.parse_known_args(argv)
    if args.mode == "serve":
        raise SystemExit(serve(args.socket, args.parent_pid))
    run_superexec(rest)


if __name__ == "__main__":
    main()
