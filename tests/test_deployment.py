"""The same app in deployment: a real SuperLink and SuperNodes on loopback, and an external Ray cluster.

Every process a test starts runs in its own session and is killed by process group.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.test_pipeline import REPO, TINY, _env, cli, only_run_dir, run

SHORT = {**TINY, "data.num_clients": 2, "clustering.num_groups": 2, "train.rounds": 1, "boost.steps": 1}


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
def processes(log_dir: Path):
    started: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (log_dir / f"{name}.log").open("w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def toml_value(value) -> str:
    return f"'{value}'" if isinstance(value, str) else str(value)


def test_pipeline_runs_through_a_superlink_and_two_supernodes(tmp_path):
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**_env(), "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    run_dir = tmp_path / "runs"
    settings = {**SHORT, "run_dir": str(run_dir)}
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in settings.items())
    with processes(tmp_path) as start:
        superlink = [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--database",
            str(tmp_path / "state.db"),
            "--port",
            str(port),
        ]
        start("superlink", [*superlink, "--disable-runtime-dependency-installation"], env)
        wait_for_port(port)
        for i in range(2):
            node = [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(free_port()),
            ]
            start(f"supernode-{i}", [*node, "--node-config", f"partition-id={i} num-partitions=2"], env)
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "loopback", "--stream", "--run-config", overrides],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        deadline = time.monotonic() + 60
        while not list(run_dir.glob("*/report.json")) and time.monotonic() < deadline:
            time.sleep(1)
    logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.log"))
    (report_file,) = run_dir.glob("*/report.json")
    report = json.loads(report_file.read_text())
    assert report["num_clients"] == 2, logs
    assert json.loads((report_file.parent / "config.json").read_text())["model.name"] == "tiny-random"


def test_simulation_attaches_to_a_ray_head_on_loopback(tmp_path):
    port = free_port()
    ray_tmp = Path("/tmp") / f"ray-elora-{port}"  # Ray's socket paths must stay short
    env = _env()
    with processes(tmp_path) as start:
        head = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1"]
        start("ray-head", [*head, "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={ray_tmp}"], env)
        wait_for_port(port)
        result = run(cli("run", "--ray-address", f"127.0.0.1:{port}", settings=SHORT), tmp_path)
        shutil.copytree(ray_tmp / "session_latest" / "logs", tmp_path / "ray-logs")
    shutil.rmtree(ray_tmp, ignore_errors=True)
    output = result.stdout + result.stderr
    assert "EnsembleLoRA: 2 clients" in output
    run_dir = only_run_dir(tmp_path)
    assert json.loads((run_dir / "config.json").read_text())["federation.ray_address"] == f"127.0.0.1:{port}"
    assert "Ray runtime started" in (tmp_path / "ray-head.log").read_text()
    # The clients ran as actors of this cluster (a local Ray of its own would log under /tmp/ray).
    actor_logs = [f for f in (tmp_path / "ray-logs").glob("worker-*") if "ClientAppActor" in f.read_text()]
    assert actor_logs
