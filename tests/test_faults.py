"""Faults on Flower's simulation engine on Ray: malformed updates never reach an adapter, and
a federation that loses too many clients stops with a clear error and its checkpoint."""

import json
import subprocess
import sys

import pytest
import torch

from elora_fed.model.adapters import load_peft_adapter
from tests.fixtures.faulty_clients import CORRUPTIONS, STRAGGLE_S
from tests.test_pipeline import REPO, TINY, _env, cli, only_run_dir

FAULTY = {
    **TINY,
    "data.num_clients": 12,
    "strategies.clustering": "strategies.baselines:OneGroup",
    "boost.steps": 0,
    "federation.max_payload_mb": 1.0,
    "federation.min_fraction": 0.25,  # 8 of the 12 clients misbehave
}


def faulty_run(mode: str, cwd, **overrides) -> dict:
    cwd.mkdir()
    settings = {**FAULTY, "run_dir": str(cwd / "runs"), **overrides}
    script = REPO / "tests" / "fixtures" / "faulty_clients.py"
    result = subprocess.run(
        [sys.executable, str(script), mode, json.dumps(settings)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = only_run_dir(cwd)
    return {
        "report": json.loads((run_dir / "report.json").read_text()),
        "adapter": load_peft_adapter(run_dir / "adapters" / "group-0"),
        "metrics": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
    }


@pytest.mark.e2e
def test_malformed_updates_are_rejected_counted_and_never_aggregated(tmp_path):
    corrupted = faulty_run("corrupt", tmp_path / "corrupt")
    crashed = faulty_run("crash", tmp_path / "crash")
    rounds = TINY["train.rounds"]
    expected: dict[str, int] = {}
    for kind in CORRUPTIONS:
        kind = "keys" if kind == "extra-key" else kind
        expected[kind] = expected.get(kind, 0) + rounds
    assert corrupted["report"]["rejected_updates"] == expected
    train = [m for m in corrupted["metrics"] if m["phase"] == "train"]
    assert [sum(m["rejected"].values()) for m in train] == [len(CORRUPTIONS)] * rounds
    assert crashed["report"]["rejected_updates"] == {}
    # The same clients' updates reached FedAvg in both runs: the bad ones changed nothing. The
    # server sums replies in client order, whatever order they arrived in, so equality is exact.
    assert corrupted["adapter"].keys() == crashed["adapter"].keys()
    for key, value in crashed["adapter"].items():
        assert torch.equal(corrupted["adapter"][key], value), key
    assert any(v.abs().sum() > 0 for k, v in crashed["adapter"].items() if "lora_B" in k)  # it did train
    got, want = (r["report"]["average"]["ensemble"]["test_loss"] for r in (corrupted, crashed))
    assert got == want


@pytest.mark.e2e
def test_too_few_answers_stop_the_run_with_a_named_error_and_keep_the_checkpoint(tmp_path):
    settings = {**TINY, "federation.drop_rate": 0.9, "federation.min_fraction": 0.5}
    result = subprocess.run(
        cli("run", settings=settings), cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=600
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "federation.min_fraction" in result.stderr and "Traceback" not in result.stderr
    run_dir = only_run_dir(tmp_path)
    assert (run_dir / "config.json").exists() and (run_dir / "clients.json").exists()
    assert not (run_dir / "report.json").exists()


@pytest.mark.e2e
def test_a_straggler_is_left_out_of_its_round_by_the_round_timeout(tmp_path):
    timeout = 30.0
    run = faulty_run("straggle", tmp_path / "straggle", **{"federation.timeout_s": timeout})
    first, second = [m for m in run["metrics"] if m["phase"] == "train"]
    assert first["failed"] == 1 and first["clients"] == FAULTY["data.num_clients"] - 1
    assert timeout <= first["wall_s"] < STRAGGLE_S  # the round ended at the timeout, not when the straggler answered
    assert second["failed"] == 0
