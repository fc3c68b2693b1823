"""Flower's own launch path: ``flwr run .`` on a local simulation federation, as a Flower user types it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from elora_fed.flower_local import local_superlink_pids, stop_local_superlink

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = (
    "model.name='tiny-random' data.num_clients=4 data.max_samples_per_client=12 data.seq_len=16 "
    "sketch.dim=32 affinity.num_subsets=20 affinity.subset_size=3 train.rounds=1 train.local_steps=2"
)


@pytest.mark.e2e
def test_flwr_run_on_a_local_simulation_federation_finishes_and_leaves_no_process(tmp_path):
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    runs = tmp_path / "runs"
    cmd = [str(BIN / "flwr"), "run", str(REPO), "local", "--stream", "--federation-config", "num-supernodes=4"]
    try:
        done = subprocess.run(
            [*cmd, "--run-config", f"{TINY} preset='demo' run_dir='{runs}'"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert local_superlink_pids(home), "the local SuperLink should still be running until stopped"
    finally:
        stopped = stop_local_superlink(home)
    assert stopped and not local_superlink_pids(home)
    again = subprocess.run(
        [str(BIN / "elora-fed"), "stop-local", "--flwr-home", str(home)], capture_output=True, text=True, env=env
    )
    assert again.returncode == 0 and "no local SuperLink running" in again.stdout
    assert not any(Path(f"/proc/{pid}").exists() for pid in stopped)
    (run_dir,) = runs.iterdir()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "demo" and config["model.name"] == "tiny-random"
    assert config["data.num_clients"] == 4 and config["data.seq_len"] == 16  # explicit keys over the preset
    report = json.loads((run_dir / "report.json").read_text())
    assert report["num_clients"] == 4 and 0 <= report["average"]["ensemble"]["test_accuracy"] <= 1
