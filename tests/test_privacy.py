"""Differential privacy of the sketch phase: clipping, noise scale, the accountant, the client hook, end to end."""

import json
import math
import subprocess

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from scipy.integrate import quad
from scipy.stats import norm

from clients import handlers as client_app
from clients.protocol import run_record
from clients.records import sketch_from_record, statistics_from_record
from elora_fed.config import RunConfig
from elora_fed.errors import ConfigError
from elora_fed.privacy.config import PrivacyConfig
from elora_fed.privacy.mechanism import (
    clip_outputs,
    clip_rows,
    compose,
    gaussian_delta,
    gaussian_epsilon,
    gaussian_mu,
    noise_generator,
    noisy_sketch,
    noisy_statistics,
    privacy_report,
    released_sketch,
    released_statistics,
    symmetric_noise,
)
from elora_fed.sketch.client_sketch import ClientSketch, SketchMetadata
from elora_fed.surrogate.affinity_modes import affinity_mode
from elora_fed.surrogate.quadratic_sums import solve_subsets_private
from elora_fed.surrogate.statistics import client_statistics
from elora_fed.surrogate.task_features import task_features

META = SketchMetadata("tiny-random", "fp32", 4, "q_proj,v_proj", 0, "rademacher", 0, 8, 10, "lm")


def sketch(n_train: int = 30, n_val: int = 10, d: int = 8, scale: float = 3.0, seed: int = 0) -> ClientSketch:
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    return ClientSketch(
        client_id=f"play:ROLE{seed}",
        split=np.array([0] * n_train + [1] * n_val, dtype=np.int8),
        sample_index=np.concatenate([np.arange(n_train), np.arange(n_val)]).astype(np.int32),
        outputs=rng.normal(-3, 8, n).astype(np.float32),
        features=(scale * rng.normal(size=(n, d))).astype(np.float32),
        labels=np.arange(n, dtype=np.int32) % 2,
        metadata=META,
    )


def config(**privacy) -> RunConfig:
    return RunConfig.from_flat({f"privacy.{k}": v for k, v in privacy.items()})


# ---------------------------------------------------------------------------- accountant


def hockey_stick_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of N(mu, 1) vs N(0, 1) by integrating the densities where the privacy loss exceeds epsilon."""
    start = mu / 2 + epsilon / mu  # the privacy loss mu x - mu^2 / 2 exceeds epsilon right of here
    return quad(lambda x: norm.pdf(x, mu, 1) - math.exp(epsilon) * norm.pdf(x), start, math.inf, epsabs=1e-14)[0]


def test_sigma_one_at_delta_1e_5_gives_the_analytic_gaussian_epsilon():
    epsilon = gaussian_epsilon(1.0, 1e-5)  # sensitivity 1, noise std 1, one release
    assert epsilon == pytest.approx(4.3772, abs=1e-4)
    assert hockey_stick_delta(epsilon, 1.0) == pytest.approx(1e-5, rel=1e-6)  # independent: the definition
    # the RDP bound (alpha mu^2 / 2 + log(1 / delta) / (alpha - 1), at the best alpha) is looser
    assert epsilon < 0.5 + math.sqrt(2 * math.log(1e5))


def test_delta_matches_the_closed_form_by_hand():
    # Phi(1/2 - 1) - e Phi(-1/2 - 1), with Phi(x) = erfc(-x / sqrt 2) / 2
    phi = lambda x: math.erfc(-x / math.sqrt(2)) / 2  # noqa: E731
    assert gaussian_delta(1.0, 1.0) == pytest.approx(phi(-0.5) - math.e * phi(-1.5), rel=1e-12)
    assert gaussian_delta(1.0, 1.0) == pytest.approx(0.12693, abs=1e-5)


@pytest.mark.parametrize("mu", [0.1, 0.5, 2.0, 2 * math.sqrt(2), 8.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-9])
def test_epsilon_inverts_the_exact_delta(mu, delta):
    epsilon = gaussian_epsilon(mu, delta)
    assert hockey_stick_delta(epsilon, mu) == pytest.approx(delta, rel=1e-5)


def test_classical_calibration_is_never_tighter_than_the_analytic_one():
    # sigma = sqrt(2 ln(1.25 / delta)) / epsilon is (epsilon, delta)-DP for epsilon < 1 (Dwork & Roth, Thm 3.22)
    for epsilon in (0.1, 0.5, 0.9):
        mu = epsilon / math.sqrt(2 * math.log(1.25 / 1e-5))
        assert gaussian_epsilon(mu, 1e-5) < epsilon


def test_epsilon_falls_with_noise_and_delta_and_composes_exactly():
    assert gaussian_epsilon(0.5, 1e-5) < gaussian_epsilon(1.0, 1e-5) < gaussian_epsilon(2.0, 1e-5)
    assert gaussian_epsilon(1.0, 1e-3) < gaussian_epsilon(1.0, 1e-5)
    assert compose([1.0] * 4) == pytest.approx(2.0)  # 4 releases of mu = 1 are one release of mu = 2
    assert gaussian_epsilon(0.0, 1e-5) == 0.0 and gaussian_epsilon(math.inf, 1e-5) == math.inf
    with pytest.raises(ValueError, match="delta"):
        gaussian_epsilon(1.0, 0.0)


def test_each_mode_is_one_gaussian_mechanism_over_its_noised_parts():
    noised = {"privacy.noise_multiplier": 2.0, "privacy.clip_norm": 0.5, "privacy.output_bound": 4.0}

    def mu(mode: str) -> float:
        return gaussian_mu(affinity_mode(RunConfig.from_flat({**noised, "affinity.mode": mode})).privacy_parts())

    assert mu("exact") == mu("gradient-cosine") == pytest.approx(2 * math.sqrt(2) / 2.0)
    assert mu("private") == mu("secure") == pytest.approx(math.sqrt(6) / 2.0)  # the same statistics, masked
    noisy = config(noise_multiplier=2.0, delta=1e-6)
    report = privacy_report(noisy, affinity_mode(noisy), releases=1)
    assert report["epsilon"] == pytest.approx(gaussian_epsilon(math.sqrt(2), 1e-6))
    assert report["delta"] == 1e-6 and "sketch phase (exact mode): per-sample" in report["covers"]
    assert privacy_report(noisy, affinity_mode(noisy), releases=0)["epsilon"] == 0.0  # nothing released
    assert privacy_report(RunConfig(), affinity_mode(RunConfig()), releases=1) == {
        "enabled": False,
        "noise_multiplier": 0.0,
        "epsilon": None,
        "covers": "nothing: no noise is added",
    }


# ---------------------------------------------------------------------------- clipping and noise


def test_clipping_bounds_row_norms_and_keeps_short_rows_and_directions():
    rows = np.random.default_rng(0).normal(size=(200, 16)) * np.linspace(0.01, 5, 200)[:, None]
    clipped = clip_rows(rows, 1.5)
    norms = np.linalg.norm(rows, axis=1)
    assert np.linalg.norm(clipped, axis=1).max() <= 1.5 + 1e-12
    np.testing.assert_array_equal(clipped[norms <= 1.5], rows[norms <= 1.5])
    cosine = (clipped * rows).sum(1) / (np.linalg.norm(clipped, axis=1) * norms)
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-12)
    np.testing.assert_array_equal(clip_rows(np.zeros((2, 3)), 1.0), 0.0)
    np.testing.assert_array_equal(clip_outputs(np.array([-20.0, 0.5, 30.0]), 10.0), [-10.0, 0.5, 10.0])


def test_sketch_noise_has_the_configured_scale_and_is_seeded_per_client():
    pc = PrivacyConfig(noise_multiplier=1.5, clip_norm=0.2, output_bound=3.0)
    zero = sketch(n_train=3000, n_val=1000, d=8, scale=0.0)
    rng = np.random.default_rng(7)
    noisy = noisy_sketch(zero, pc, rng)
    assert noisy.features.std() == pytest.approx(1.5 * 0.2, rel=0.02)  # 32,000 draws
    assert abs(noisy.features.mean()) < 0.01
    clipped_outputs = np.clip(zero.outputs.astype(np.float64), -3, 3)
    assert (noisy.outputs - clipped_outputs).std() == pytest.approx(1.5 * 3.0, rel=0.03)
    assert (noisy.labels == -1).all()
    np.testing.assert_array_equal(noisy.sample_index, zero.sample_index)

    run = config(noise_multiplier=1.5, clip_norm=0.2, output_bound=3.0, reproducible=True)
    one = sketch(seed=1)
    first, again = released_sketch(one, run), released_sketch(one, run)
    np.testing.assert_array_equal(first.features, again.features)  # reproducible
    other = released_sketch(dataclass_with_id(one, "play:OTHER"), run)
    assert not np.allclose(first.features, other.features)  # but different across clients
    assert not np.array_equal(noise_generator(run, "a").normal(size=4), noise_generator(run, "b").normal(size=4))
    unseeded = config(noise_multiplier=1.5, reproducible=False)
    assert not np.array_equal(released_sketch(one, unseeded).features, released_sketch(one, unseeded).features)


def dataclass_with_id(s: ClientSketch, client_id: str) -> ClientSketch:
    import dataclasses

    return dataclasses.replace(s, client_id=client_id)


def test_statistics_noise_has_the_configured_scale_and_stays_psd():
    pc = PrivacyConfig(noise_multiplier=2.0, clip_norm=0.5)
    zero = sketch(n_train=20, n_val=5, d=400, scale=0.0)
    noisy = noisy_statistics(zero, pc, np.random.default_rng(3))
    exact = client_statistics(task_features(zero))
    for split, ref in ((noisy.train, exact.train), (noisy.validation, exact.validation)):
        assert float(split.count) == float(ref.count) and float(split.loss) == 0.0
        assert float(split.grad.std()) == pytest.approx(2.0 * 0.5, rel=0.12)  # 400 draws
        curv = split.curv.double().numpy()
        np.testing.assert_allclose(curv, curv.T, atol=1e-5)
        assert np.linalg.eigvalsh(curv).min() > -1e-4
    upper = symmetric_noise(300, 0.7, np.random.default_rng(1))
    np.testing.assert_array_equal(upper, upper.T)
    assert upper[np.triu_indices(300)].std() == pytest.approx(0.7, rel=0.02)  # 45,150 draws


def test_statistics_are_built_from_clipped_rows():
    big = sketch(d=8, scale=50.0)
    pc = PrivacyConfig(noise_multiplier=1e-9, clip_norm=1.0)  # negligible noise: only the clipping shows
    noisy = noisy_statistics(big, pc, np.random.default_rng(0))
    clipped = dataclass_with_rows(big, clip_rows(big.features, 1.0))
    exact = client_statistics(task_features(clipped), dtype=torch.float64)
    np.testing.assert_allclose(noisy.train.grad.numpy(), exact.train.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(noisy.validation.curv.numpy(), exact.validation.curv.numpy(), rtol=1e-4, atol=1e-6)
    assert float(torch.linalg.vector_norm(noisy.train.grad)) <= 30 * 1.0 + 1e-4  # n_train rows of norm <= C


def dataclass_with_rows(s: ClientSketch, features: np.ndarray) -> ClientSketch:
    import dataclasses

    return dataclasses.replace(s, features=features.astype(np.float32))


def test_noisy_statistics_still_solve_every_subset():
    run = config(noise_multiplier=1.0, clip_norm=1.0)
    stats = [released_statistics(sketch(d=32, seed=i), run) for i in range(4)]
    est = solve_subsets_private(stats, [(0, 1), (2, 3), (0,), (1, 2, 3)], lam=0.3)
    assert np.isfinite(est.losses[~np.isnan(est.losses)]).all()


def test_without_noise_the_release_is_unchanged():
    one = sketch()
    assert released_sketch(one, RunConfig()) is one
    plain, released = client_statistics(task_features(one)), released_statistics(one, RunConfig())
    for split in ("train", "validation"):
        for name in ("count", "loss", "grad", "curv"):
            torch.testing.assert_close(getattr(getattr(released, split), name), getattr(getattr(plain, split), name))


@pytest.mark.parametrize(
    ("key", "value"),
    [("noise_multiplier", -1.0), ("clip_norm", 0.0), ("output_bound", -2.0), ("delta", 0.0), ("delta", 1.0)],
)
def test_bad_privacy_settings_are_rejected_by_name(key, value):
    with pytest.raises(ConfigError, match=f"privacy.{key}"):
        config(**{key: value})


# ---------------------------------------------------------------------------- the client hook and a whole run

TINY = {"model.name": "tiny-random", "data.num_clients": 3, "data.max_samples_per_client": 12, "sketch.dim": 16}


def query_sketch(settings: dict, partition: int = 1) -> RecordDict:
    node = Context(
        run_id=1,
        node_id=10,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )
    return client_app.sketch_content(RecordDict({"run": run_record(RunConfig.from_flat(settings))}), node)


def test_the_client_noises_its_reply_before_sending_it():
    plain = sketch_from_record(query_sketch(TINY))
    private = {
        "privacy.noise_multiplier": 1.0,
        "privacy.clip_norm": 0.05,
        "privacy.output_bound": 2.0,
        "privacy.reproducible": True,
    }
    noisy = sketch_from_record(query_sketch({**TINY, **private}))
    residual = noisy.features - clip_rows(plain.features, 0.05)  # the noise: z C = 0.05 per entry
    assert residual.std() == pytest.approx(0.05, rel=0.25) and (noisy.labels == -1).all()
    again = sketch_from_record(query_sketch({**TINY, **private}))
    np.testing.assert_array_equal(noisy.features, again.features)
    stats = statistics_from_record(query_sketch({**TINY, **private, "affinity.mode": "private"}), 16)[1]
    assert float(stats.train.loss) == 0.0 and float(stats.train.count) == float((plain.split == 0).sum())


@pytest.mark.e2e
def test_a_noisy_run_on_ray_reports_its_epsilon(tmp_path):
    from tests.test_pipeline import _env, cli, only_run_dir

    settings = {
        **TINY,
        "data.num_clients": 4,
        "data.seq_len": 16,
        "data.max_samples_per_client": 10,
        "affinity.num_subsets": 4,
        "affinity.subset_size": 2,
        "clustering.num_groups": 2,
        "train.rounds": 1,
        "train.local_steps": 1,
        "boost.steps": 0,
        "ensemble.weight_steps": 5,
        "privacy.noise_multiplier": 2.0,
        "privacy.clip_norm": 0.1,
        "privacy.delta": 1e-6,
    }
    result = subprocess.run(
        cli("run", settings=settings), cwd=tmp_path, capture_output=True, text=True, timeout=900, env=_env()
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    report = json.loads((run_dir / "report.json").read_text())["privacy"]
    assert report["enabled"] and report["delta"] == 1e-6 and report["releases"] == 1
    assert report["epsilon"] == pytest.approx(gaussian_epsilon(math.sqrt(2), 1e-6))  # mu = 2 sqrt(2) / z
    assert "## Differential privacy" in (run_dir / "report.md").read_text()
    assert "privacy: (epsilon, delta)" in result.stdout + result.stderr
    saved = [ClientSketch.load(p) for p in (run_dir / "sketches").glob("*.npz")]
    assert len(saved) == 4 and all((s.labels == -1).all() for s in saved)  # the server only saw noisy sketches
