"""The elora-fed command line, run as a user runs it (a subprocess, offline)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TINY = ["--set", "model.name=tiny-random", "--set", "data.num_clients=3", "--set", "data.max_samples_per_client=12"]


def elora_fed(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "elora_fed.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_data_stats_prints_clients_and_sample_distribution(tmp_path):
    done = elora_fed("data-stats", "--preset", "demo", *TINY, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["clients"] == 3 and stats["candidates"] > 1000
    assert stats["samples_per_client"]["max"] == 12


@pytest.mark.e2e
def test_check_writes_a_run_directory(tmp_path):
    done = elora_fed("check", *TINY, "--set", "run_dir='out'", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run,) = (tmp_path / "out").iterdir()
    assert {p.name for p in run.iterdir()} == {"config.json", "clients.json", "data_stats.json", "check.json"}
    report = json.loads((run / "check.json").read_text())
    assert [(m["model"], m["precision"]) for m in report["models"]] == [
        ("tiny-random", "fp32"),
        ("tiny-random", "nf4"),
        ("tiny-random", "fp32"),
    ]
    for model in report["models"]:
        assert model["grad_norm_B"] > 0 and model["grad_norm_A"] == 0  # B = 0 at theta*: A gets no gradient


@pytest.mark.e2e
def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    cases = {
        (
            "data-stats",
            "--set",
            "model.precison=nf4",
        ): "unknown config key 'model.precison'; did you mean 'model.precision'",
        ("data-stats", "--set", "model.name=./missing-model"): "model path missing-model does not exist",
        ("data-stats", "--set", "data.seq_len=100000"): "data.seq_len = 100000 is impossible",
        ("data-stats", "--set", "data.path='/nonexistent/texts'"): "Shakespeare texts not found at /nonexistent/texts",
        (
            "data-stats",
            "--set",
            "model.name=nobody/none",
        ): "Use the embedded default model.name = 'smollm2-135m-instruct'",
    }
    for args, message in cases.items():
        done = elora_fed(*args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.e2e
def test_sketch_writes_one_file_per_client(tmp_path):
    done = elora_fed("sketch", *TINY, "--set", "sketch.dim=32", "--set", "run_dir='out'", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run,) = (tmp_path / "out").iterdir()
    from elora_fed.sketch.client_sketch import load_sketches

    sketches = load_sketches(run / "sketches")
    summary = json.loads((run / "sketch_summary.json").read_text())
    assert len(sketches) == 3 and summary["rows"] == sum(len(s.outputs) for s in sketches)
    assert all(s.features.shape[1] == 32 and s.metadata.projection_seed == 0 for s in sketches)
    # train and validation only: 12 capped samples split 10/1/1
    assert all(sorted(set(s.split.tolist())) == [0, 1] and len(s.outputs) == 11 for s in sketches)


@pytest.mark.e2e
def test_sketch_of_classification_tasks(tmp_path):
    fixture = Path(__file__).parent / "fixtures" / "classification.jsonl"
    args = [
        "--set",
        "model.name=tiny-random",
        "--set",
        "data.source='classification'",
        "--set",
        f"data.path='{fixture}'",
    ]
    done = elora_fed("sketch", *args, "--set", "sketch.dim=16", "--set", "run_dir='out'", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run,) = (tmp_path / "out").iterdir()
    from elora_fed.sketch.client_sketch import load_sketches

    sketches = load_sketches(run / "sketches")
    assert [s.client_id for s in sketches] == ["entailment", "sentiment", "topic"]
    assert all(s.metadata.task == "classification" and (s.labels >= 0).all() for s in sketches)


@pytest.mark.e2e
def test_affinity_groups_sketched_clients(tmp_path):
    six = ["--set", "model.name=tiny-random", "--set", "data.num_clients=6", "--set", "data.max_samples_per_client=12"]
    assert elora_fed("sketch", *six, "--set", "sketch.dim=16", "--set", "run_dir='sk'", cwd=tmp_path).returncode == 0
    (sketch_run,) = (tmp_path / "sk").iterdir()
    small = ["--set", "affinity.subset_size=3", "--set", "affinity.num_subsets=10", "--set", "affinity.lam=0.1"]
    variants = {
        "private": ["--set", "affinity.mode='private'"],
        "spectral": ["--set", "clustering.method='spectral'", "--set", "clustering.num_groups=2"],
    }
    for name, extra in variants.items():
        done = elora_fed(
            "affinity", str(sketch_run / "sketches"), *small, *extra, "--set", f"run_dir='{name}'", cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr
        (run,) = (tmp_path / name).iterdir()
        groups = json.loads((run / "groups.json").read_text())
        affinity = np.load(run / "affinity.npy")
        assert affinity.shape == (6, 6) and (affinity == affinity.T).all()
        assert sorted(c for g in groups["groups"] for c in g) == sorted(groups["clients"])  # a partition
        assert (run / "affinity.png").stat().st_size > 1000
    assert groups["num_groups"] == 2
    done = elora_fed("affinity", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert done.returncode == 2 and "no client sketches" in done.stderr
