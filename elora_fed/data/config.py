"""The config section of the clients' data: ``data.*``.

Torch-free: the ClientApp reads its config before it imports the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from elora_fed.errors import ConfigError
from elora_fed.section import Section, check_choice, check_range

DATA_SOURCES = ("shakespeare", "flwr-shakespeare", "classification")


@dataclass(frozen=True)
class DataConfig(Section):
    """Which clients to build, and how their samples are cut and split.

    Every client is one task: a (play, role) pair for ``shakespeare`` (offline Gutenberg
    texts) and ``flwr-shakespeare`` (the ``flwrlabs/shakespeare`` hub dataset), or one task
    of a multi-task file for ``classification``. Samples are ``seq_len`` tokens long and
    split per client into contiguous train / validation / test blocks.
    ``num_clients = 0`` keeps every client with at least ``min_samples`` samples; otherwise
    the largest ones. ``max_samples_per_client = 0`` means no cap. ``clients_per_task = K``
    deals each classification task to K clients (``task#0`` .. ``task#K-1``), so a
    benchmark of a few tasks runs as a larger federation. A classification client capped by
    ``max_samples_per_client`` keeps each split's share of the cap, with its label mix.
    """

    source: str = "shakespeare"
    path: str = ""
    seq_len: int = 64
    min_samples: int = 10
    num_clients: int = 0
    max_samples_per_client: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    clients_per_task: int = 1

    def validate(self) -> None:
        check_choice("data.source", self.source, DATA_SOURCES)
        check_range("data.seq_len", self.seq_len, low=2)
        check_range("data.min_samples", self.min_samples, low=3)
        check_range("data.num_clients", self.num_clients, low=0)
        check_range("data.max_samples_per_client", self.max_samples_per_client, low=0)
        check_range("data.val_fraction", self.val_fraction, low=0.0, high=1.0, inclusive_low=False)
        check_range("data.test_fraction", self.test_fraction, low=0.0, high=1.0, inclusive_low=False)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction} "
                "leaves no training samples: keep their sum below 1"
            )
        if self.source == "classification" and not self.path:
            raise ConfigError("data.source = 'classification' needs data.path (a JSONL/CSV file or a datasets name)")
        check_range("data.clients_per_task", self.clients_per_task, low=1)
        if self.clients_per_task > 1 and self.source != "classification":
            raise ConfigError(
                f"data.clients_per_task = {self.clients_per_task} needs data.source = 'classification': "
                f"the clients of {self.source} are speaking roles"
            )
        if 0 < self.max_samples_per_client < self.min_samples and self.source != "classification":
            raise ConfigError(
                f"data.max_samples_per_client = {self.max_samples_per_client} is below "
                f"data.min_samples = {self.min_samples}: no client could be kept"
            )
