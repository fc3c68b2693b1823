"""500 clients on Flower's simulation engine on Ray: the whole run directory, and loading it back.

The fault-free run is shared with ``tests/test_pipeline_dropout.py``, in its own file so
that pytest-xdist (``--dist loadfile``) runs the dropout run on the other worker while this
one runs: the two 500-client runs overlap instead of queueing on one worker.
"""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from peft import PeftModel

from elora_fed.errors import DataError
from elora_fed.model.adapters import load_peft_adapter
from elora_fed.model.config import ModelConfig
from elora_fed.model.models import load_base_model
from tests.test_pipeline import TINY, _env, cli, only_run_dir, run

FIVE_HUNDRED = {
    **TINY,
    "data.num_clients": 500,
    "data.max_samples_per_client": 10,
    "affinity.subset_size": 25,
    "affinity.num_subsets": 0,
    "clustering.num_groups": 5,  # the relaxation's rounding may split further
    "train.rounds": 1,
    "train.fraction": 0.5,
}


def shared_fault_free_500(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> tuple[Path, str]:
    """One fault-free 500-client run per test session, shared by the xdist workers.

    The first worker to ask runs it under a file lock; the other waits and reads its run
    directory and output. Without xdist (``worker_id == "master"``) it runs in this session's
    own temporary directory.
    """
    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # parent: this session's, shared by its workers
    cwd, output, code = root / "fault-free-500", root / "fault-free-500.out", root / "fault-free-500.rc"
    with FileLock(str(root / "fault-free-500.lock")):
        if not code.exists():
            cwd.mkdir()
            result = subprocess.run(
                cli("run", settings=FIVE_HUNDRED), cwd=cwd, capture_output=True, text=True, timeout=1500, env=_env()
            )
            output.write_text(result.stderr + result.stdout)
            code.write_text(str(result.returncode))
    text = output.read_text()
    assert code.read_text() == "0", f"the fault-free 500-client run failed:\n{text[-6000:]}"
    return only_run_dir(cwd), text


@pytest.fixture(scope="module")
def fault_free_500(tmp_path_factory, worker_id) -> tuple[Path, str]:
    return shared_fault_free_500(tmp_path_factory, worker_id)


@pytest.mark.e2e
def test_500_clients_end_to_end_write_the_whole_run_directory(fault_free_500):
    run_dir, output = fault_free_500
    m = check_run_dir(run_dir, clients=500, fraction=0.5)
    assert f"EnsembleLoRA: 500 clients, {m} groups" in output


@pytest.mark.e2e
def test_the_run_loads_back_as_an_ensemble_whose_score_reproduces_the_reported_test_loss(fault_free_500):
    from elora_fed.data.federated_data import load_clients
    from elora_fed.ensemble.inference import load_ensemble
    from elora_fed.model.batches import client_batches

    run_dir, _ = fault_free_500
    ensemble = load_ensemble(run_dir)
    report = {r["client_id"]: r for r in json.loads((run_dir / "report.json").read_text())["clients"]}
    assert ensemble.clients == sorted(report)
    boosted = {g for g, group in ensemble.groups.items() if group.boosts}
    clients = {c.client_id: c for c in load_clients(ensemble.config.data, ensemble.tokenizer)}
    # a client weighing several groups and, where boosting kept a step, one of a boosted group
    chosen = [next(c for c in ensemble.clients if sum(w > 0 for w in ensemble.weights[c]) > 1)]
    chosen += [c for c in ensemble.clients if report[c]["group"] in boosted][:1]
    for client_id in chosen:
        tokens = clients[client_id].splits["test"]
        batches = [b for _, b in client_batches(clients[client_id], "test", 8, ensemble.tokenizer.pad_token_id)]
        assert ensemble.outputs(client_id, batches).loss() == pytest.approx(report[client_id]["test_loss"], abs=1e-4)
        scored = ensemble.score_ids(client_id, tokens)
        assert [s.tokens for s in scored] == [list(row[1:]) for row in tokens]
        mean = float(np.mean([lp for s in scored for lp in s.log_probs]))  # rows of equal length
        assert -mean == pytest.approx(report[client_id]["test_loss"], abs=1e-4)
    one = ensemble.score(chosen[0], ["To be, or not to be"])[0]
    assert len(one.log_probs) == len(one.tokens) and all(lp < 0 for lp in one.log_probs)
    h = ensemble.next_token_log_odds(chosen[0], one.tokens)
    assert h.ndim == 1 and h.shape[0] >= len(ensemble.tokenizer)  # the model's vocabulary may be padded
    greedy = ensemble.generate(chosen[0], "To be", max_new_tokens=3, temperature=0)
    assert greedy == ensemble.generate(chosen[0], "To be", max_new_tokens=3, temperature=0)  # deterministic
    predicted = run(cli("predict", str(run_dir), "--client", chosen[0], "To be, or not to be"), run_dir)
    assert json.loads(predicted.stdout.splitlines()[-1])["loss"] == pytest.approx(one.loss, abs=1e-5)
    with pytest.raises(DataError, match="is not in this run"):
        ensemble.score("no such role", ["To be, or not to be"])
    with pytest.raises(DataError, match="needs at least 2"):
        ensemble.score(chosen[0], [""])


def check_run_dir(run_dir: Path, clients: int, fraction: float) -> int:
    """Every artifact of a finished one-round run is there and consistent; returns the number of groups."""
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data.num_clients"] == clients and config["train.fraction"] == fraction
    listed = json.loads((run_dir / "clients.json").read_text())
    assert len(listed) == clients and all(c["train"] >= 1 and c["test"] >= 1 for c in listed)
    assert np.load(run_dir / "affinity.npy").shape == (clients, clients)
    assert (run_dir / "affinity.png").stat().st_size > 10_000
    groups = json.loads((run_dir / "groups.json").read_text())["groups"]
    m = len(groups)
    assert sorted(c for g in groups for c in g) == sorted(c["client_id"] for c in listed)
    assert len(list((run_dir / "sketches").glob("*.npz"))) == clients
    adapters = sorted(p.name for p in (run_dir / "adapters").iterdir())
    assert sorted(a for a in adapters if "-boost-" not in a) == sorted(f"group-{g}" for g in range(m))
    weights = json.loads((run_dir / "ensemble_weights.json").read_text())["weights"]
    assert len(weights) == clients and all(len(w) == m and abs(sum(w) - 1) < 1e-6 for w in weights.values())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in metrics if line["phase"] == "train"]
    assert len(train) == 1 and train[0]["clients"] == sum(max(1, int(fraction * len(g))) for g in groups)
    # First-order boosting reuses the residuals of the loss check: no residual exchange of its own.
    exchanges = [line["exchange"] for line in metrics if line["phase"] == "boost"]
    assert exchanges == ["group train loss", "boost 1: train loss"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["num_clients"] == clients and len(report["clients"]) == clients
    assert all(np.isfinite(r["test_loss"]) and 0 <= r["test_accuracy"] <= 1 for r in report["clients"])
    assert "| ensemble |" in (run_dir / "report.md").read_text()
    # A group adapter is a real peft adapter of the base model.
    model = PeftModel.from_pretrained(
        load_base_model(ModelConfig(name="tiny-random")), run_dir / "adapters" / "group-0"
    )
    saved = load_peft_adapter(run_dir / "adapters" / "group-0")
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in saved.items())
    return m
