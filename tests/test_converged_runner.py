"""The converged-budget experiment's decisions: the budget rule, the run order, paired intervals."""

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from elora_fed.config import load_config, parse_override, toml_value
from elora_fed.errors import ConfigError, DataError
from strategies.baselines import method_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # scripts, not a package
import converged as runner
from shakespeare_converged import SHAKESPEARE


def curve(losses):
    return [{"round": r, "validation_loss": v, "train_loss": v} for r, v in enumerate(losses, start=1)]


def test_the_budget_is_the_best_learning_rate_where_its_validation_loss_stops_improving():
    curves = {0.002: curve([4.0, 3.8, 3.692, 3.69, 3.689, 3.70]), 0.005: curve([3.9, 3.75, 3.72, 3.75, 3.8, 3.9])}
    budget = runner.choose_budget(SHAKESPEARE, curves)
    assert budget["lr"] == 0.002
    assert budget["rounds"] == 3  # 3.692 is within 0.1% of the minimum 3.689
    assert budget["plateau_reached"]
    still_falling = runner.choose_budget(SHAKESPEARE, {0.002: curve([4.0, 3.5, 3.0, 2.999])})
    assert still_falling["rounds"] == 3 and not still_falling["plateau_reached"]


def test_random_groups_and_the_compute_matched_baseline_wait_for_the_runs_they_depend_on():
    budget = {"lr": 0.002, "rounds": 4}
    assert runner.settings_for(SHAKESPEARE, "random", 0, "bf16", budget, {}) is None
    ensemble = {"num_groups": 3, "phases": {"sketch": {"flops": 30.0}, "train": {"flops": 100.0}, "test": {"flops": 9}}}
    one = {"phases": {"train": {"flops": 100.0}, "test": {"flops": 9}}}
    done = {"ensemble-seed0": ensemble, "qlora-seed0": one}
    assert runner.settings_for(SHAKESPEARE, "random", 0, "bf16", budget, done)["clustering.num_groups"] == 3
    matched = runner.settings_for(SHAKESPEARE, "qlora-matched", 0, "bf16", budget, done)
    assert matched["train.rounds"] == 4 + 2  # 30 extra FLOPs at 25 per round
    assert runner.settings_for(SHAKESPEARE, "qlora", 0, "nf4", budget, {})["model.precision"] == "nf4"
    order = runner.plan(SHAKESPEARE, [0, 1])
    assert order[:3] == [("ensemble", 0, "bf16"), ("qlora", 0, "bf16"), ("random", 0, "bf16")]
    assert order[-1] == ("qlora", 0, "nf4")


def test_paired_differences_average_over_shared_seeds_and_the_interval_covers_the_mean():
    def run(seed, losses):
        return {"settings": {"seed": seed}, "clients": [{"client_id": c, "test_loss": v} for c, v in losses.items()]}

    a = [run(0, {"x": 1.0, "y": 2.0}), run(1, {"x": 1.2, "y": 2.2})]
    b = [run(0, {"x": 1.5, "y": 2.1}), run(2, {"x": 9.0, "y": 9.0})]
    diff = runner.per_client_difference(a, b)  # seed 0 only
    np.testing.assert_allclose(diff, [-0.5, -0.1])
    rng = np.random.default_rng(0)
    many = rng.normal(-0.2, 0.1, size=200)
    low, high = runner.bootstrap_interval(many)
    assert low < many.mean() < high and high < 0


def test_a_comparison_uses_only_the_seeds_both_methods_finished():
    def run(seed, loss, flops):
        return {
            "settings": {"seed": seed},
            "average": {"ensemble": {"test_loss": loss}},
            "phases": {"sketch": {"flops": 0.0}, "train": {"flops": flops}, "test": {"flops": 0.0}},
            "clients": [{"client_id": "x", "test_loss": loss}],
        }

    centered = [run(0, 4.0, 110.0), run(1, 3.0, 110.0)]
    one = [run(0, 5.0, 100.0), run(2, 1.0, 1.0)]
    out = runner.compare(centered, one, "qlora", SHAKESPEARE.metric)
    assert out["seeds_vs_qlora"] == [0]
    assert out["loss_change_vs_qlora"] == pytest.approx(4.0 / 5.0 - 1)
    assert out["compute_ratio_vs_qlora"] == pytest.approx(1.1)
    assert out["paired_mean_difference_vs_qlora"] == pytest.approx(-1.0)
    assert ("ensemble-centered", 2, "bf16") in runner.plan(SHAKESPEARE, [0, 1, 2])


def test_method_settings_name_every_baseline_and_reject_bad_ones():
    assert method_settings("qlora")["strategies.clustering"] == "strategies.baselines:OneGroup"
    assert method_settings("mtl-ft", finetune_steps=3)["train.finetune_steps"] == 3
    with pytest.raises(ConfigError, match="num_groups"):
        method_settings("random")
    with pytest.raises(ConfigError, match="unknown method"):
        method_settings("best")
    keep_best = load_config(overrides=method_settings("ensemble-keep-best"))  # a valid run: it evaluates every round
    assert keep_best.train.keep_best and keep_best.train.validation_every == 1
    validated = load_config(overrides=method_settings("ensemble-validated"))  # its ablation: all but keep_best
    assert not validated.train.keep_best and validated.train.validation_every == 1
    assert replace(keep_best, train=replace(keep_best.train, keep_best=False)) == validated
    planned = runner.plan(SHAKESPEARE, [0, 1, 2])
    assert {("ensemble-keep-best", 0, "bf16"), ("ensemble-validated", 0, "bf16")} <= set(planned)
    for key, value in {**method_settings("ensemble-keep-best"), **method_settings("qlora"), "train.lr": 0.005}.items():
        assert parse_override(f"{key}={toml_value(value)}") == (key, value)  # as the run's process reads it


def test_the_classification_report_adds_per_task_accuracy_majority_and_points():
    from classification_report import BIGBENCH, majority_accuracy, per_task

    def run(seed, accuracies):
        clients = [{"client_id": t, "test_accuracy": a} for t, a in accuracies.items()]
        return {"settings": {"seed": seed}, "clients": clients, "average": {"ensemble": {"test_accuracy": 0.0}}}

    ens = [run(0, {"a": 0.8, "b": 0.6}), run(1, {"a": 0.6, "b": 0.6})]
    one = [run(0, {"a": 0.5, "b": 0.5})]
    for r in ens + one:
        r["average"]["ensemble"]["test_accuracy"] = float(np.mean([c["test_accuracy"] for c in r["clients"]]))
    fixture = Path(__file__).resolve().parent / "fixtures" / "classification.jsonl"
    protocol = {**BIGBENCH.protocol, "data.path": str(fixture), "data.max_samples_per_client": 0}
    out = {"protocol": protocol, "seeds_vs_qlora": [0]}
    per_task({"ensemble": ens, "qlora": one}, out)
    assert out["tasks"] == ["a", "b"]
    assert out["per_task"]["ensemble"]["a"] == pytest.approx({"mean": 0.7, "std": 0.1, "n": 2})
    assert out["accuracy_change_vs_qlora"] == pytest.approx(100 * (0.7 - 0.5))  # seed 0 only, in points
    assert out["majority_accuracy"] == majority_accuracy(protocol)
    assert set(out["majority_accuracy"]) == {"entailment", "sentiment", "topic"}
    assert all(0 <= v <= 1 for v in out["majority_accuracy"].values())


def test_comparing_two_reports_finds_the_one_client_and_weight_that_changed():
    from compare_reports import compare

    def report(loss_b: float, weight: float) -> dict:
        rows = [
            {"client_id": "a", "group": 0, "test_loss": 1.0, "weights": {"0": 1.0, "1": 0.0}},
            {"client_id": "b", "group": 1, "test_loss": loss_b, "weights": {"0": weight, "1": 1 - weight}},
        ]
        return {"clients": rows, "average": {}, "boosts": [], "num_groups": 2}

    assert compare(report(2.0, 0.5), report(2.0, 0.5))["identical_test_losses"]
    changed = compare(report(2.0, 0.5), report(2.25, 0.75))
    assert not changed["identical_test_losses"] and changed["identical_groups"]
    assert changed["largest_difference_per_client"] == {"test_loss": 0.25, "weights": 0.25}
    with pytest.raises(DataError, match="different clients"):
        compare(report(2.0, 0.5), {**report(2.0, 0.5), "clients": report(2.0, 0.5)["clients"][:1]})


def test_the_m_sweep_fixes_the_number_of_groups_and_reports_loss_against_the_groups_found():
    budget = {"lr": 0.002, "rounds": 4}
    settings = runner.settings_for(SHAKESPEARE, runner.sweep_method(8), 0, "bf16", budget, {})
    assert settings["clustering.num_groups"] == 8 and "strategies.clustering" not in settings
    assert runner.sweep_m("ensemble-centered") is None and runner.sweep_m("ensemble-m12") == 12
    order = runner.plan(SHAKESPEARE, [0, 1, 2])
    assert [p for p in order if runner.sweep_m(p[0])] == [
        (runner.sweep_method(m), 0, "bf16") for m in SHAKESPEARE.m_sweep
    ]

    def run(seed, groups, loss):
        clients = [{"client_id": "x", "test_loss": loss}, {"client_id": "y", "test_loss": loss + 1}]
        return {
            "settings": {"seed": seed},
            "num_groups": groups,
            "group_sizes": {str(g): 1 for g in range(groups)},
            "average": {"ensemble": {"test_loss": loss + 0.5, "test_accuracy": 0.1}},
            "phases": {"train": {"flops": 1.0}},
            "clients": clients,
        }

    by_method = {
        "qlora": [run(0, 1, 4.0), run(1, 1, 0.0)],
        "ensemble": [run(0, 5, 4.2)],
        "ensemble-m2": [run(0, 2, 3.9)],
        "ensemble-m8": [run(0, 7, 4.5)],  # the rounding found 7 groups
    }
    rows = runner.m_sweep_rows(SHAKESPEARE, by_method, 0)
    assert [(r["m"], r["groups"]) for r in rows] == [(1, 1), (2, 2), ("auto", 5), (8, 7)]
    assert rows[1]["paired_mean_difference_vs_qlora"] == pytest.approx(-0.1)  # seed 1's one adapter is left out
    assert "paired_ci_vs_qlora" not in rows[0]


def test_only_named_runs_run_and_in_the_order_given(tmp_path, monkeypatch):
    ran = []

    def execute(results, work, key, settings):
        ran.append(key)
        return {"num_groups": 3}

    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(runner, "write_report", lambda *args: None)
    budget = {"lr": 0.002, "rounds": 4}
    runner.runs_stage(SHAKESPEARE, tmp_path, tmp_path, budget, [0], only=["ensemble-m8-seed0", "ensemble-m2-seed0"])
    assert ran == ["ensemble-m8-seed0", "ensemble-m2-seed0"]
    with pytest.raises(RuntimeError, match="random"):  # it waits on ensemble-seed0, which is not to run
        runner.runs_stage(SHAKESPEARE, tmp_path, tmp_path, budget, [0], only=["random-seed0"])


def test_the_paper_compute_leaves_out_training_validation_passes():
    def phase(forward_tokens, backward_tokens, per_token=2.0, backward_per_token=3.0):
        forward, backward = forward_tokens * per_token, backward_tokens * backward_per_token
        return {
            "flops": {"forward": forward, "backward": backward, "sketch": 0.0, "total": forward + backward},
            "tokens": {"forward": forward_tokens, "backward": backward_tokens},
            "wall_s": 1.0,
        }

    validated = {"phases": {"train": runner.phase_cost(phase(120, 100)), "test": runner.phase_cost(phase(50, 0))}}
    assert runner.training_validation_flops(validated) == pytest.approx(20 * 2.0)  # 20 positions forward only
    assert runner.paper_flops(validated) == pytest.approx(100 * 2.0 + 100 * 3.0)
    assert runner.full_flops(validated) == pytest.approx(120 * 2.0 + 100 * 3.0 + 50 * 2.0)
    older = {"phases": {"train": {"flops": 500.0, "wall_s": 1.0}}}  # recorded before token counts: no validation
    assert runner.training_validation_flops(older) == 0.0 and runner.paper_flops(older) == 500.0
