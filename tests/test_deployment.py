"""The same app in deployment: a real SuperLink and SuperNodes on loopback, and an external Ray cluster.

Every process a test starts runs in its own session and is killed by process group.
"""

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from strategies.loopback import BIN, free_port, processes, start_federation, toml_value, wait_for_port
from tests.test_pipeline import REPO, TINY, _env, cli, only_run_dir, run

__all__ = ["BIN", "SHORT", "free_port", "processes", "toml_value", "wait_for_port"]  # tests/test_security.py uses them

SHORT = {**TINY, "data.num_clients": 2, "clustering.num_groups": 2, "train.rounds": 1, "boost.steps": 1}


@pytest.mark.e2e
def test_pipeline_runs_through_a_superlink_and_two_supernodes(tmp_path):
    run_dir = tmp_path / "runs"
    settings = {**SHORT, "run_dir": str(run_dir)}
    with processes(tmp_path) as start:
        federation = start_federation(start, _env(), nodes=2, holders=False)
        result = federation.flwr_run(REPO, settings, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        report = wait_for_report(run_dir)
    assert report["num_clients"] == 2
    assert json.loads((next(run_dir.glob("*/config.json"))).read_text())["model.name"] == "tiny-random"


def wait_for_report(run_dir: Path, timeout: float = 60) -> dict:
    """The run's report: ``flwr run --stream`` can return before the ServerApp has written it."""
    deadline = time.monotonic() + timeout
    while not list(run_dir.glob("*/report.json")) and time.monotonic() < deadline:
        time.sleep(1)
    (report_file,) = run_dir.glob("*/report.json")
    return json.loads(report_file.read_text())


@pytest.mark.e2e
def test_with_model_holders_a_supernode_restarted_mid_run_loses_only_its_replies(tmp_path):
    """Each node's model holder serves every message from one model load, behind ``elora-fed
    supernode`` (short waits); SuperNode 1 is killed after the sketch phase and restarted: the
    run finishes under the dropout rules."""
    run_dir = tmp_path / "runs"
    settings = {**SHORT, "data.num_clients": 3, "run_dir": str(run_dir), "federation.timeout_s": 90.0}
    with processes(tmp_path) as start:
        federation = start_federation(start, _env(), nodes=3, holders=True, short_waits=True)
        outcome: dict[str, subprocess.CompletedProcess[str]] = {}
        runner = threading.Thread(target=lambda: outcome.update(result=federation.flwr_run(REPO, settings, 900)))
        runner.start()
        deadline = time.monotonic() + 600
        while not any('"phase": "sketch"' in f.read_text() for f in run_dir.glob("*/metrics.jsonl")):
            assert runner.is_alive() and time.monotonic() < deadline, "the run ended before its sketch phase"
            time.sleep(0.5)
        start.kill("supernode-1")
        time.sleep(3)
        federation.start_node(1)  # the same partition, the same holder
        runner.join()
        result = outcome["result"]
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        report = wait_for_report(run_dir)
    logs = {p.stem: p.read_text() for p in tmp_path.glob("*.log")}
    # The restarted SuperNode registers as a new node; its client's lost replies count as a
    # dropout (the retry went to the old node), and the run finishes with the other two.
    assert report["num_clients"] == 2 and len(report["unanswered"]) == 1, logs.get("superlink", "")[-3000:]
    lines = [json.loads(line) for f in run_dir.glob("*/metrics.jsonl") for line in f.read_text().splitlines()]
    assert sum(m.get("failed", 0) for m in lines) > 0
    for i in range(3):  # every message went through the node's holder, which loaded the model at most once
        served = [
            line for line in logs[f"holder-{i}"].splitlines() if line.startswith("model holder: ") and " in " in line
        ]
        assert len(served) >= 2, logs[f"holder-{i}"]
        assert all(line.endswith(("model loads 0)", "model loads 1)")) for line in served), logs[f"holder-{i}"]
        # elora-fed supernode handed its messages to ClientApp processes started before them (clients/prestarted.py)
        assert "ClientApp handed to prestarted worker-" in logs[f"supernode-{i}"], logs[f"supernode-{i}"][-3000:]
        assert served[-1].endswith("model loads 1)")


@pytest.mark.e2e
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
