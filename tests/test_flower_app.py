"""The Flower app on Flower's simulation engine on Ray: every node answers as its client."""

import json

from flwr.simulation import run_simulation

from clients.app import app as client_app
from elora_fed.config import RunConfig
from elora_fed.federated_data import load_lm_clients
from elora_fed.models import load_tokenizer
from elora_fed.splits import SPLITS
from strategies.app import app as server_app


def test_each_simulated_node_reports_its_own_client(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run_dir "runs" is relative
    run_simulation(
        server_app, client_app, num_supernodes=4, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    )
    (run,) = (tmp_path / "runs").iterdir()
    reported = json.loads((run / "clients.json").read_text())
    assert json.loads((run / "config.json").read_text()) == RunConfig().to_flat()
    defaults = RunConfig()  # run_simulation passes no run config: the app's defaults apply
    expected = load_lm_clients(defaults.data, load_tokenizer(defaults.model)).clients[:4]
    assert reported == [{"client_id": c.client_id, **{s: len(c.splits[s]) for s in SPLITS}} for c in expected]
