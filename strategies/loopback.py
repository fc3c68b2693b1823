"""A real deployment on one machine: a SuperLink, SuperNodes and (optionally) their model holders on loopback.

What the deployment tests and ``experiments/deployment_overhead.py`` start. Every process
runs in its own session and is killed by process group when the ``LoopbackFederation``
context ends, so nothing outlives a test or a benchmark.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elora_fed.config import toml_value

BIN = Path(sys.executable).parent  # the venv's scripts, whether or not it is activated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@contextlib.contextmanager
def processes(log_dir: Path) -> Iterator[Processes]:
    """Start processes that log to ``log_dir/NAME.log``; all are killed (by process group) on exit."""
    started = Processes(log_dir)
    try:
        yield started
    finally:
        started.kill_all()


@dataclass
class Processes:
    log_dir: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __call__(self, name: str, cmd: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("a")
        proc = subprocess.Popen(cmd, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.running[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.running.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def kill_all(self) -> None:
        for name in list(self.running):
            self.kill(name)


@dataclass
class LoopbackFederation:
    """An insecure SuperLink with ``nodes`` SuperNodes (``partition-id`` 0..nodes-1), reachable as ``loopback``."""

    start: Processes
    env: dict[str, str]
    port: int
    nodes: int
    holders: bool
    short_waits: bool = False  # ``elora-fed supernode`` (clients.supernode) instead of ``flower-supernode``
    prestart: bool = True  # with short waits: prestarted ClientApps (clients.prestarted), or ``--no-prestart``

    def start_node(self, i: int) -> None:
        """SuperNode ``i`` (and, with holders, its model holder first); restarting one reuses its holder file."""
        node_config = f"partition-id={i} num-partitions={self.nodes}"
        if self.holders:
            file = self.start.log_dir / f"holder-{i}.json"
            if f"holder-{i}" not in self.start.running:
                file.unlink(missing_ok=True)
                cmd = [str(BIN / "elora-fed"), "model-holder", "--file", str(file)]
                self.start(f"holder-{i}", cmd, self.env)
                deadline = time.monotonic() + 120
                while not file.exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"model holder {i} wrote no {file} in 120 s")
                    time.sleep(0.2)
            node_config += f" model-holder='{file}'"
        ours = [str(BIN / "elora-fed"), "supernode", *([] if self.prestart else ["--no-prestart"]), "--"]
        launcher = ours if self.short_waits else [str(BIN / "flower-supernode")]
        node = [*launcher, "--insecure", "--superlink", f"127.0.0.1:{self.port}"]
        self.start(f"supernode-{i}", [*node, "--port", str(free_port()), "--node-config", node_config], self.env)

    def flwr_run(
        self, app: Path, overrides: Mapping[str, Any], timeout: float = 1800
    ) -> subprocess.CompletedProcess[str]:
        """``flwr run APP loopback --stream`` with ``overrides`` as its ``--run-config``."""
        run_config = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
        cmd = [str(BIN / "flwr"), "run", str(app), "loopback", "--stream", "--run-config", run_config]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)


def start_federation(
    start: Processes,
    env: Mapping[str, str],
    nodes: int,
    holders: bool,
    short_waits: bool = False,
    prestart: bool = True,
) -> LoopbackFederation:
    """A SuperLink on a free port, its ``FLWR_HOME`` connection ``loopback``, and ``nodes`` SuperNodes."""
    port = free_port()
    home = start.log_dir / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    full_env = {**env, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    superlink = [str(BIN / "flower-superlink"), "--insecure", "--database", str(start.log_dir / "state.db")]
    start("superlink", [*superlink, "--port", str(port), "--disable-runtime-dependency-installation"], full_env)
    wait_for_port(port)
    federation = LoopbackFederation(start, full_env, port, nodes, holders, short_waits, prestart)
    for i in range(nodes):
        federation.start_node(i)
    return federation
