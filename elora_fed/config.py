"""The run configuration: one ``RunConfig`` of typed sections, loaded from Flower's flat run config.

Flower hands an app its ``[tool.flwr.app.config]`` table as a flat mapping of dotted keys
(``"model.precision" = "nf4"``), merged with ``--run-config`` overrides. This module turns
that mapping into frozen dataclasses, rejecting unknown keys and bad values with errors that
name them. Each section sits beside the code it configures (``elora_fed/<package>/config.py``);
the two that configure the Flower glue (``federation``, ``strategies``) are here, since the
core does not import the glue. The dataclass defaults are the defaults; ``pyproject.toml``
repeats them for ``flwr run`` and a test keeps the two identical.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from elora_fed.data.bigbench import JSONL_NAME as BIGBENCH_JSONL
from elora_fed.data.bigbench import default_dir as bigbench_dir
from elora_fed.data.config import DataConfig
from elora_fed.ensemble.config import BoostConfig, EnsembleConfig
from elora_fed.errors import ConfigError
from elora_fed.grouping.config import ClusteringConfig
from elora_fed.model.config import AdapterConfig, ModelConfig, TrainConfig
from elora_fed.privacy.config import PrivacyConfig, SecAggConfig
from elora_fed.section import Section, check_dotted_path, check_range, coerce
from elora_fed.sketch.config import SketchConfig
from elora_fed.surrogate.config import AffinityConfig


@dataclass(frozen=True)
class FederationConfig(Section):
    """How the server talks to the federation.

    ``num_nodes`` is how many nodes the server waits for before the first phase (nodes
    register asynchronously); ``0`` means one per client of the data config. ``wait_s``
    bounds that wait and the nodes' first answer (it loads their data); ``timeout_s`` bounds
    every later exchange of messages (stragglers past it are left out of that round). ``max_in_flight`` bounds the messages queued at the
    SuperLink at once (0: all), which keeps Flower's simulation engine from spending a CPU
    core scanning them. ``poll_s`` is the wait between the server's checks for replies: every
    message's latency includes up to one of them, and a check of at most ``max_in_flight``
    messages costs the SuperLink one lookup. ``ray_address`` attaches ``elora-fed run`` to a running Ray
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
    poll_s: float = 0.2
    ray_address: str = ""
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    min_fraction: float = 0.5
    retries: int = 1
    drop_rate: float = 0.0
    max_update_norm: float = 100.0
    max_payload_mb: float = 256.0

    def validate(self) -> None:
        check_range("federation.num_nodes", self.num_nodes, low=0)
        check_range("federation.wait_s", self.wait_s, low=0.0, inclusive_low=False)
        check_range("federation.timeout_s", self.timeout_s, low=0.0, inclusive_low=False)
        check_range("federation.max_in_flight", self.max_in_flight, low=0)
        check_range("federation.poll_s", self.poll_s, low=0.0, inclusive_low=False)
        check_range("federation.cpus_per_client", self.cpus_per_client, low=0.0, inclusive_low=False)
        check_range("federation.gpus_per_client", self.gpus_per_client, low=0.0)
        check_range("federation.min_fraction", self.min_fraction, low=0.0, high=1.0)
        check_range("federation.retries", self.retries, low=0)
        check_range("federation.drop_rate", self.drop_rate, low=0.0, high=1.0, inclusive_high=False)
        check_range("federation.max_update_norm", self.max_update_norm, low=0.0, inclusive_low=False)
        check_range("federation.max_payload_mb", self.max_payload_mb, low=0.0, inclusive_low=False)


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
            check_dotted_path(f"strategies.{f.name}", getattr(self, f.name))


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
            merged[key] = coerce(key, value, type(known[key]))
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


def toml_value(value: Any) -> str:
    """A run-config value as ``--run-config`` and ``--set`` read it (``parse_override``): strings quoted, booleans lower case."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"'{value}'" if isinstance(value, str) else str(value)


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
