"""Optional differential privacy for what a client releases in the sketch phase: clipping, Gaussian noise, accounting.

With ``privacy.noise_multiplier = z > 0`` every client clips and noises its sketch-phase
reply on its own machine, before anything is sent (``clients.handlers``, ``query.sketch``):

- every per-sample projected gradient row g~_s is clipped to L2 norm <= C (``clip_norm``):
  g~_s * min(1, C / |g~_s|);
- exact and gradient-cosine modes (per-sample rows leave the client): every base output
  b_s is clipped to [-B, B] (``output_bound``); then every row gets N(0, (z C)^2) per
  feature and every output N(0, (z B)^2); class labels are withheld (-1: the server does
  not use them);
- private mode (additive statistics leave the client; also ``secure``, which masks these
  same statistics, so ``released_statistics`` must run before the masking), per split,
  from the clipped rows:
  grad = sum loss'(b_s) g~_s gets N(0, (z C)^2) per entry (|loss'| < 1, so one sample's
  term has norm <= C); curv = sum loss''(b_s) g~_s g~_s^T gets a symmetric noise matrix,
  N(0, (z C^2 / 4)^2) on each entry of the upper triangle and diagonal, mirrored
  (loss'' <= 1/4, so one sample's term has Frobenius norm <= C^2 / 4), and is then
  projected onto the PSD cone (post-processing: it keeps every subset's Hessian positive
  definite); the loss sums are not released (sent as 0: the affinity
  f^_i({i}) - T_ij cancels them, so they would cost privacy for nothing); counts are exact.

What is protected: one training or validation sample of one client, against anyone who sees
the sketch-phase replies (the server included, if it cannot regenerate the noise, see
``reproducible`` below). Neighbouring datasets differ by *replacing* one sample (same
counts: a client's sample counts per split are public, ``query.stats`` sends them), so a
clipped quantity whose per-sample term lies in a ball of radius r has L2 sensitivity 2 r
(PSD rank-one terms: sqrt(2) r). The reply is one Gaussian mechanism with
mu = sqrt(sum_k (sensitivity_k / noise_std_k)^2) over its noised parts:
exact mode mu = sqrt((2C / zC)^2 + (2B / zB)^2) = 2 sqrt(2) / z, private mode
mu = sqrt((2C / zC)^2 + (sqrt(2) C^2/4 / (z C^2/4))^2) = sqrt(6) / z. A sample belongs to
one client and sits in one split, so the whole sketch phase (all clients) satisfies the
same guarantee (parallel composition); k releases compose to mu sqrt(k) (exactly: the
composition of Gaussian mechanisms is a Gaussian mechanism, Dong, Roth & Su 2022).

Accountant: the analytic Gaussian mechanism (Balle & Wang 2018, Theorem 8). A Gaussian
mechanism with sensitivity / noise = mu is (epsilon, delta)-DP exactly for
delta(epsilon) = Phi(mu/2 - epsilon/mu) - e^epsilon Phi(-mu/2 - epsilon/mu); epsilon for a
given delta is found by root finding. E.g. mu = 1, delta = 1e-5: epsilon = 4.377.

Not protected: the sample counts; everything outside the sketch phase (federated training
updates, boosting residuals and ridge statistics, evaluation metrics); with
``reproducible = true`` (off by default) the noise is seeded by (run seed, client id), so
whoever knows the run config (the server) can regenerate and subtract it: the guarantee
then holds only against parties without the run seed. ``reproducible = false`` draws the
noise from the OS's entropy (a rerun is then a second release: two releases, mu sqrt(2)).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import log_ndtr

from elora_fed.config import RunConfig
from elora_fed.privacy.config import PrivacyConfig
from elora_fed.seeds import derive_seed
from elora_fed.sketch.client_sketch import ClientSketch
from elora_fed.surrogate.statistics import ClientStatistics, SplitStatistics, client_statistics, split_statistics
from elora_fed.surrogate.task_features import task_features

if TYPE_CHECKING:
    from elora_fed.surrogate.affinity_modes import AffinityMode

# ---------------------------------------------------------------------------- clipping


def clip_rows(rows: np.ndarray, clip_norm: float) -> np.ndarray:
    """Each row scaled to L2 norm <= ``clip_norm`` (rows already inside are unchanged); float64."""
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, clip_norm / np.maximum(norms, np.finfo(np.float64).tiny))


def clip_outputs(outputs: np.ndarray, bound: float) -> np.ndarray:
    """Outputs clipped to [-bound, bound]; float64."""
    return np.clip(np.asarray(outputs, dtype=np.float64), -bound, bound)


# ---------------------------------------------------------------------------- noise


def noise_generator(config: RunConfig, client_id: str) -> np.random.Generator:
    """The client's noise source: seeded by (run seed, client id), or OS entropy if not ``reproducible``."""
    if not config.privacy.reproducible:
        return np.random.default_rng()
    return np.random.default_rng(derive_seed(config.seed, "privacy", client_id, bits=128))


def noisy_sketch(sketch: ClientSketch, privacy: PrivacyConfig, rng: np.random.Generator) -> ClientSketch:
    """Exact mode: clipped rows and outputs plus Gaussian noise; labels withheld (-1)."""
    z, c, b = privacy.noise_multiplier, privacy.clip_norm, privacy.output_bound
    features = clip_rows(sketch.features, c)
    outputs = clip_outputs(sketch.outputs, b)
    features += rng.normal(0.0, z * c, size=features.shape)
    outputs += rng.normal(0.0, z * b, size=outputs.shape)
    return dataclasses.replace(
        sketch,
        features=features.astype(np.float32),
        outputs=outputs.astype(np.float32),
        labels=np.full_like(sketch.labels, -1),
    )


def symmetric_noise(dim: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """A (dim, dim) symmetric matrix: N(0, std^2) on and above the diagonal, mirrored below."""
    upper = np.triu(rng.normal(0.0, std, size=(dim, dim)))
    return upper + np.triu(upper, 1).T


def psd_projection(matrix: np.ndarray) -> np.ndarray:
    """The nearest PSD matrix in Frobenius norm: negative eigenvalues set to 0."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.maximum(values, 0.0)) @ vectors.T


def noisy_split_statistics(
    outputs: np.ndarray, rows: np.ndarray, privacy: PrivacyConfig, rng: np.random.Generator
) -> SplitStatistics:
    """One split's statistics from clipped rows, noised; loss sum not released (0). float32, as sent."""
    z, c = privacy.noise_multiplier, privacy.clip_norm
    clipped = clip_rows(rows, c)
    exact = split_statistics(torch.as_tensor(outputs), torch.as_tensor(clipped), dtype=torch.float64)
    d = clipped.shape[1]
    grad = exact.grad.numpy() + rng.normal(0.0, z * c, size=d)
    curv = psd_projection(exact.curv.numpy() + symmetric_noise(d, z * c * c / 4, rng))
    return SplitStatistics(
        count=exact.count.to(torch.float32),
        loss=torch.zeros((), dtype=torch.float32),
        grad=torch.as_tensor(grad, dtype=torch.float32),
        curv=torch.as_tensor(curv, dtype=torch.float32),
    )


def noisy_statistics(sketch: ClientSketch, privacy: PrivacyConfig, rng: np.random.Generator) -> ClientStatistics:
    """Private mode: the client's train and validation statistics, clipped and noised (module docstring)."""
    train = noisy_split_statistics(*sketch.rows("train"), privacy, rng)
    validation = noisy_split_statistics(*sketch.rows("validation"), privacy, rng)
    return ClientStatistics(train, validation)


def released_sketch(sketch: ClientSketch, config: RunConfig) -> ClientSketch:
    """What a client sends in exact mode: its sketch, clipped and noised if ``privacy`` is on."""
    if not config.privacy.enabled:
        return sketch
    return noisy_sketch(sketch, config.privacy, noise_generator(config, sketch.client_id))


def released_statistics(sketch: ClientSketch, config: RunConfig) -> ClientStatistics:
    """What a client sends in private mode: its statistics, from clipped rows and noised if ``privacy`` is on."""
    if not config.privacy.enabled:
        return client_statistics(task_features(sketch))
    return noisy_statistics(sketch, config.privacy, noise_generator(config, sketch.client_id))


# ---------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class NoisedPart:
    """One noised quantity of a release: its L2 sensitivity (replace one sample) and its noise std."""

    name: str
    sensitivity: float
    noise_std: float


def row_parts(privacy: PrivacyConfig) -> list[NoisedPart]:
    """The noised parts of a released sketch (``released_sketch``): its gradient rows and base outputs."""
    z, c, b = privacy.noise_multiplier, privacy.clip_norm, privacy.output_bound
    return [NoisedPart("projected gradient rows", 2 * c, z * c), NoisedPart("base outputs", 2 * b, z * b)]


def statistics_parts(privacy: PrivacyConfig) -> list[NoisedPart]:
    """The noised parts of released statistics (``released_statistics``): gradient and curvature sums."""
    z, c = privacy.noise_multiplier, privacy.clip_norm
    return [
        NoisedPart("gradient sums", 2 * c, z * c),
        NoisedPart("curvature sums (upper triangle)", math.sqrt(2) * c * c / 4, z * c * c / 4),
    ]


def gaussian_mu(parts: list[NoisedPart]) -> float:
    """mu of the Gaussian mechanism that releases all ``parts`` with independent noise: sqrt(sum (sens / std)^2)."""
    if any(p.noise_std <= 0 for p in parts):
        return math.inf
    return math.sqrt(sum((p.sensitivity / p.noise_std) ** 2 for p in parts))


def compose(mus: list[float]) -> float:
    """mu of the composition of Gaussian mechanisms: sqrt(sum mu_i^2) (exact, not a bound)."""
    return math.sqrt(sum(m * m for m in mus))


def gaussian_delta(epsilon: float, mu: float) -> float:
    """The smallest delta for which a Gaussian mechanism with sensitivity / noise = mu is (epsilon, delta)-DP.

    Balle & Wang 2018, Theorem 8: Phi(mu/2 - epsilon/mu) - e^epsilon Phi(-mu/2 - epsilon/mu),
    evaluated in log space so that it stays accurate where both terms are tiny.
    """
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    first = float(log_ndtr(mu / 2 - epsilon / mu))
    second = epsilon + float(log_ndtr(-mu / 2 - epsilon / mu))
    return max(0.0, -math.exp(first) * math.expm1(second - first))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon for which a Gaussian mechanism with sensitivity / noise = mu is (epsilon, delta)-DP.

    0 for mu = 0 (nothing released); inf for mu = inf (no noise).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if mu <= 0:
        return 0.0
    if math.isinf(mu) or gaussian_delta(0.0, mu) <= delta:
        return math.inf if math.isinf(mu) else 0.0
    high = 1.0
    while gaussian_delta(high, mu) > delta:
        high *= 2
    return float(brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, high, xtol=1e-12, rtol=1e-12))


def privacy_report(config: RunConfig, mode: AffinityMode, releases: int) -> dict[str, Any]:
    """The run's guarantee, for report.json: settings, mu, (epsilon, delta), what is covered and what is not.

    ``releases`` is how many times each client released its sketch-phase reply (1 in a run
    that sketched, 0 in one that skipped sketching).
    """
    pc = config.privacy
    if not pc.enabled:
        return {"enabled": False, "noise_multiplier": 0.0, "epsilon": None, "covers": "nothing: no noise is added"}
    parts = mode.privacy_parts()
    mu = compose([gaussian_mu(parts)] * releases)
    return {
        "enabled": True,
        "noise_multiplier": pc.noise_multiplier,
        "clip_norm": pc.clip_norm,
        "output_bound": pc.output_bound,
        "delta": pc.delta,
        "epsilon": gaussian_epsilon(mu, pc.delta),
        "mu": mu,
        "releases": releases,
        "reproducible_noise": pc.reproducible,
        "accountant": "analytic Gaussian mechanism (Balle & Wang 2018); releases composed exactly (Gaussian DP)",
        "neighbouring": "one train or validation sample of one client replaced (sample counts are public)",
        "parts": [dataclasses.asdict(p) for p in parts],
        "covers": f"the sketch phase ({config.affinity.mode} mode): {mode.released}, noised on each client first",
        "not_covered": [
            "sample counts per split",
            "federated training updates",
            "boosting residuals and ridge statistics",
            "evaluation losses, accuracies and ensemble weights",
            *(["the noise itself, for whoever knows the run seed (reproducible noise)"] if pc.reproducible else []),
        ],
    }


def describe(report: dict[str, Any]) -> str:
    """One line for the log."""
    if not report["enabled"]:
        return "privacy: off (no noise)"
    return (
        f"privacy: (epsilon, delta) = ({report['epsilon']:.3g}, {report['delta']:.3g}) per sample, "
        f"noise multiplier {report['noise_multiplier']:g}, clip norm {report['clip_norm']:g}, "
        f"output bound {report['output_bound']:g}, mu {report['mu']:.3g}; covers {report['covers']}"
    )


def markdown_lines(report: dict[str, Any]) -> list[str]:
    """The report.md section."""
    lines = ["", "## Differential privacy", ""]
    if not report["enabled"]:
        return [*lines, "- off: no noise (privacy.noise_multiplier = 0)"]
    return [
        *lines,
        f"- (epsilon, delta) = ({report['epsilon']:.4g}, {report['delta']:.3g}) per sample "
        f"({report['neighbouring']}), mu = {report['mu']:.4g}, {report['releases']} release(s)",
        f"- noise multiplier {report['noise_multiplier']:g}, clip norm {report['clip_norm']:g}, "
        f"output bound {report['output_bound']:g}; accountant: {report['accountant']}",
        f"- covers {report['covers']}",
        f"- not covered: {'; '.join(report['not_covered'])}",
    ]
