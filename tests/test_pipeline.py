"""The whole federated pipeline on Flower's simulation engine on Ray, through the ``elora-fed`` CLI.

Each test runs ``elora-fed run`` in a subprocess (its own Ray instance) on the tiny random
Llama with short rounds, and checks the run directory it leaves.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "model.name": "tiny-random",
    "data.num_clients": 6,
    "data.seq_len": 16,
    "data.max_samples_per_client": 12,
    "sketch.dim": 32,
    "affinity.num_subsets": 20,
    "affinity.subset_size": 3,
    "clustering.num_groups": 2,
    "train.rounds": 2,
    "train.local_steps": 2,
    "train.lr": 0.01,
    "boost.steps": 1,
}


def cli(*args: str, settings: dict | None = None) -> list[str]:
    overrides = [f"--set={k}={v}" for k, v in (settings or {}).items()]
    return [sys.executable, "-m", "elora_fed.cli", *args, *overrides]


def run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _env() -> dict[str, str]:
    """The environment for the processes a test starts: this interpreter's scripts first on PATH.

    ``make test`` runs ``.venv/bin/pytest`` without activating the venv, and the SuperLink
    starts ``flwr-serverapp`` (and Ray its workers) by name.
    """
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def only_run_dir(cwd: Path) -> Path:
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


@pytest.mark.e2e
def test_a_run_killed_after_grouping_resumes_to_the_uninterrupted_result(tmp_path):
    settings = {**TINY, "train.rounds": 3, "train.local_steps": 6}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    killed.mkdir()
    run(cli("run", settings=settings), whole)
    reference = json.loads((only_run_dir(whole) / "report.json").read_text())

    process = subprocess.Popen(
        cli("run", settings=settings),
        cwd=killed,
        env=_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            states = list(killed.glob("runs/*/checkpoint/state.json"))
            if states and "groups" in json.loads(states[0].read_text())["info"]["done"]:
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    run_dir = only_run_dir(killed)
    assert not (run_dir / "report.json").exists()
    done = json.loads((run_dir / "checkpoint" / "state.json").read_text())["info"]["done"]
    assert "groups" in done and "train" not in done

    run(cli("run", "--resume", str(run_dir)), killed)
    resumed = json.loads((run_dir / "report.json").read_text())
    assert [c["client_id"] for c in resumed["clients"]] == [c["client_id"] for c in reference["clients"]]
    for got, want in zip(resumed["clients"], reference["clients"], strict=True):
        assert got["group"] == want["group"]
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)
        assert got["weights"] == pytest.approx(want["weights"], rel=1e-4, abs=1e-6)
    phases = [json.loads(line)["phase"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert phases.count("sketch") == 1 and phases.count("train") == 3  # nothing logged twice


@pytest.mark.e2e
def test_custom_clustering_fedadam_trained_boosting_and_a_validation_curve(tmp_path):
    settings = {
        **TINY,
        "train.validation_every": 1,
        "train.patience": 1,
        "train.rounds": 4,
        "strategies.clustering": f"{REPO}/experiments/custom_strategy.py:PlayClustering",
        "train.aggregation": "flwr.serverapp.strategy:FedAdam",
        "boost.variant": "trained",
        "boost.rounds": 1,
    }
    run(cli("run", settings=settings), tmp_path)
    run_dir = only_run_dir(tmp_path)
    groups = json.loads((run_dir / "groups.json").read_text())
    plays = [sorted({c.split(":")[0] for c in g}) for g in groups["groups"]]
    assert all(len(p) == 1 for p in plays) and len({p[0] for p in plays}) == len(plays)  # one group per play
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "boost-train" in [m["phase"] for m in metrics]
    curve = [m for m in metrics if m["phase"] == "train"]
    assert all(np.isfinite(m["validation_loss"]) and 0 <= m["validation_accuracy"] <= 1 for m in curve)
    assert all(set(m["aggregation"].values()) == {"FedAdam"} for m in curve)  # the configured strategy ran
    # patience 1: training ran until the first round whose validation loss was not a new best
    losses = [m["validation_loss"] for m in curve]
    first_worse = next((r for r in range(1, len(losses)) if losses[r] >= min(losses[:r])), None)
    assert len(curve) == (4 if first_worse is None else first_worse + 1)


@pytest.mark.e2e
def test_classification_clients_private_affinity_and_fedprox(tmp_path):
    """Private mode end to end: only additive statistics leave the clients, for affinity and boosting."""
    settings = {
        **TINY,
        "data.source": "classification",
        "data.path": str(REPO / "tests" / "fixtures" / "classification.jsonl"),
        "data.seq_len": 48,
        "affinity.mode": "private",
        "train.aggregation": "flwr.serverapp.strategy:FedProx",
    }
    del settings["data.num_clients"], settings["data.max_samples_per_client"]
    run(cli("run", settings=settings), tmp_path)
    run_dir = only_run_dir(tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["num_clients"] >= 3
    assert (run_dir / "statistics.npz").exists() and not (run_dir / "sketches").exists()
    assert np.load(run_dir / "affinity.npy").shape == (report["num_clients"],) * 2
    accuracies = [r["test_accuracy"] for r in report["clients"]]
    assert all(0 <= a <= 1 for a in accuracies)
    # FedProx ran, and every group's clients were sent its proximal term
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [m for m in rounds if m["phase"] == "train"]
    assert rounds and all(set(m["aggregation"].values()) == {"FedProx"} for m in rounds)
    assert all(m["proximal_mu"].keys() == m["aggregation"].keys() for m in rounds)
    assert all(mu > 0 for m in rounds for mu in m["proximal_mu"].values())


@pytest.mark.e2e
def test_bad_strategy_path_fails_before_the_simulation_starts(tmp_path):
    bad = subprocess.run(
        cli("run", settings={**TINY, "train.aggregation": "flwr.serverapp.strategy:FedNothing"}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert bad.returncode == 2 and "train.aggregation" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_mtl_ft_baseline_skips_sketching_and_books_its_costs(tmp_path):
    settings = {
        **TINY,
        "strategies.clustering": "strategies.baselines:OneGroup",
        "boost.steps": 0,
        "train.finetune_steps": 3,
    }
    run(cli("run", settings=settings), tmp_path)
    run_dir = only_run_dir(tmp_path)
    assert not (run_dir / "sketches").exists() and not (run_dir / "affinity.npy").exists()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["num_groups"] == 1
    accounting = json.loads((run_dir / "accounting.json").read_text())
    phases = accounting["phases"]
    assert "sketch" not in phases and phases["train"]["flops"]["backward"] > 0
    # MTL-FT's step count is chosen on validation: every client fine-tunes 3 steps there, and reports
    # its loss after 0 to 3; the test fine-tunes the chosen count (none if 0 won).
    chosen = json.loads((run_dir / "finetune_steps.json").read_text())
    curve = chosen["mean_validation_loss_by_steps"]
    assert len(curve) == 4 and chosen["clients"] == 6 and curve[0] != curve[3]  # the steps changed the adapter
    assert chosen["chosen"] == report["finetune_steps"] == int(np.argmin(curve))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (line,) = [m for m in metrics if m["phase"] == "weights"]
    assert line["validation_loss"] == pytest.approx(min(curve))
    assert 0 < phases["weights"]["tokens"]["backward"] <= 6 * 3 * 8 * 16  # clients x steps x batch x positions
    assert (phases["test"]["tokens"]["backward"] > 0) == (chosen["chosen"] > 0)
    assert accounting["total"]["bytes_sent"] > 0 and accounting["total"]["peak_client_rss_bytes"] > 0
    assert set(accounting["bytes_per_client"]) == {c["client_id"] for c in report["clients"]}


@pytest.mark.e2e
def test_local_training_evaluates_each_clients_own_adapter_only(tmp_path):
    settings = {**TINY, "strategies.clustering": "strategies.baselines:OneGroupPerClient", "boost.steps": 0}
    run(cli("run", settings=settings), tmp_path)
    run_dir = only_run_dir(tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["num_groups"] == 6
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [m for m in metrics if m["phase"] == "weights"]  # no weights learned over other clients' adapters
    for row in report["clients"]:
        assert row["weights"][str(row["group"])] == 1.0 and sum(row["weights"].values()) == 1.0
        assert row["test_loss"] == pytest.approx(row["own_group_test_loss"], rel=1e-6)
    # each test request carried one adapter, not six: a sixth of the one-group-per-client bytes
    sent = json.loads((run_dir / "accounting.json").read_text())["phases"]["test"]["bytes"]["sent"]
    train = json.loads((run_dir / "accounting.json").read_text())["phases"]["train"]
    assert sent < 1.5 * train["bytes"]["sent"] / train["messages"] * 6
