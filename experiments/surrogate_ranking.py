"""Does the surrogate rank subsets for the same member as real fine-tuning does? And is T right?

The affinity matrix depends on how the sketch-space estimate orders different subsets for
one member, not on its level (the level is mostly the member's loss before fine-tuning,
which `experiments/estimation_error.py` shows is easy). This script measures that order,
on subsets other than estimation_error's: the last 10, by id, of the 30 largest Shakespeare
roles (SmolLM2-135M, LoRA r = 4 on q, v, 32-token samples, at most 40 per role), every
single role, 30 random pairs of them, and 2 calibration subsets of 3 to 5 roles. The data
orders clients by id, not by size, so 6 of these 10 roles are also among estimation_error's
20 (the 20 largest); none of its subsets is.

Every subset is really fine-tuned from theta* for 100 Adam steps (5x estimation_error's 20),
and each member's validation loss log(1 + exp(-h)) is measured after 20, 40 and 100 steps
of that one run (the first t steps of it are a t-step run). Training runs under bf16
autocast where the CPU has it, every loss is measured in fp32. The surrogate estimates the
same losses at d = 400, with the default lambda (``affinity.lam``) and with lambda
calibrated on the calibration subsets at each length. Reported per (length, lambda):
- ``within_member_order_agreement``: over every member and every two subsets that contain
  it, the share of pairs the estimate orders as real fine-tuning does (chance: 0.5);
- ``kendall_tau``: Kendall's tau between estimated and real loss over one member's
  subsets, averaged over members;
- ``spearman_of_change``: Spearman of f^ - f(theta*) against f - f(theta*), pooled;
- ``pairwise_transfer_spearman``: what T claims, checked directly. For the 30 pairs in
  both directions (60 cases), the real gain of i from fine-tuning on {i, j} rather than
  {i}, f_i({i}) - f_i({i, j}), against the affinity A_ij the pipeline clusters on
  (``affinity_from_features`` with the default subset size and count);
  ``pairwise_transfer_spearman_direct`` uses the surrogate's own f^_i({i}) - f^_i({i, j}).

``--replicates`` fine-tunes every single role once more at another seed (its own file,
``subset-<i>-replicate.json``): how reproducible the real gains are, the ceiling on any
estimate's agreement with them (``seed_noise``).

Resumable: each fine-tuned subset is stored in ``--work`` as it finishes and skipped on
restart, so the run survives interruption. ``--shard K/N`` splits the fine-tuning over N
one-thread processes (OMP_NUM_THREADS=1); the report is written by a run whose loop finds
every subset finished. On 2 AVX2 cores, one thread: about 260 s per subset.

    python experiments/surrogate_ranking.py [--work experiments/results/surrogate_ranking]

Writes experiments/results/surrogate_ranking.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from elora_fed.data.config import DataConfig
from elora_fed.data.federated_data import load_lm_clients
from elora_fed.data.lm_samples import LMSamples
from elora_fed.model.adapters import AdapterState, adapter_state, attach_lora, load_adapter_state
from elora_fed.model.batches import Batch, client_batches
from elora_fed.model.compute import compute_context, resolve_compute_dtype
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import EMBEDDED_MODEL, load_base_model, load_tokenizer
from elora_fed.model.training import evaluate_log_loss, train_adapter
from elora_fed.sketch.gradients import gradient_dim, sketch_batches
from elora_fed.sketch.projection import JLProjector
from elora_fed.surrogate.affinity import affinity_from_features
from elora_fed.surrogate.config import AffinityConfig
from elora_fed.surrogate.lambda_calibration import calibrate_lambda
from elora_fed.surrogate.subset_solver import solve_subsets
from elora_fed.surrogate.task_features import TaskFeatures

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTER = AdapterConfig(rank=4, alpha=8, target_modules="q_proj,v_proj", seed=0)
LAMBDA_GRID = [float(x) for x in np.logspace(-4, 1, 21)]
LENGTHS = (1, 2, 5)  # multiples of --steps, measured along each run
SKIP_ROLES = 20  # of the 20 + roles largest roles, sorted by id, the first 20 are skipped
DIM = 400


def plan_subsets(n: int, pairs: int, calibration: int, seed: int) -> dict[str, list[tuple[int, ...]]]:
    """Every single role, ``pairs`` distinct random pairs, and calibration subsets of 3 to 5 roles."""
    rng = np.random.RandomState(seed)
    all_pairs = list(itertools.combinations(range(n), 2))
    chosen = [all_pairs[k] for k in sorted(rng.choice(len(all_pairs), size=pairs, replace=False))]
    return {
        "singles": [(i,) for i in range(n)],
        "pairs": chosen,
        "calibration": [
            tuple(sorted(rng.choice(n, size=rng.randint(3, 6), replace=False).tolist())) for _ in range(calibration)
        ],
    }


@dataclass(frozen=True)
class RankingSetup:
    """The roles, the model at theta* and the subsets every fine-tuning and estimate here is made on."""

    model_config: ModelConfig
    clients: tuple[LMSamples, ...]
    model: torch.nn.Module
    theta_star: AdapterState
    train_batches: list[list[Batch]]
    val_batches: list[list[Batch]]
    plan: dict[str, list[tuple[int, ...]]]


def ranking_setup(model_name: str, roles: int, batch_size: int, pairs: int, calibration: int) -> RankingSetup:
    """The last ``roles``, by id, of the 20 + roles largest roles; 32-token samples, at most 40 per role; LoRA at theta*."""
    model_config = ModelConfig(name=model_name)
    data = load_lm_clients(
        DataConfig(seq_len=32, num_clients=SKIP_ROLES + roles, max_samples_per_client=40), load_tokenizer(model_config)
    )
    clients = data.clients[SKIP_ROLES:]
    if len(clients) < roles:
        raise SystemExit(f"need {SKIP_ROLES + roles} roles, the data has {len(data.clients)}")
    model = attach_lora(load_base_model(model_config), ADAPTER)
    # LM samples need no padding: every row has seq_len + 1 tokens.
    return RankingSetup(
        model_config=model_config,
        clients=clients,
        model=model,
        theta_star=adapter_state(model),
        train_batches=[[b for _, b in client_batches(c, "train", batch_size, 0)] for c in clients],
        val_batches=[[b for _, b in client_batches(c, "validation", batch_size, 0)] for c in clients],
        plan=plan_subsets(len(clients), pairs, calibration, seed=1),
    )


def job_path(work: Path, subset: tuple[int, ...], suffix: str = "") -> Path:
    """The file one fine-tuned subset is stored in; ``suffix`` "-replicate" for its second seed."""
    return work / f"subset-{'-'.join(map(str, subset))}{suffix}.json"


def within_member_order(
    est: dict[tuple[int, ...], np.ndarray], real: dict[tuple[int, ...], np.ndarray], n: int
) -> tuple[float, float, int]:
    """(order agreement, mean Kendall tau): per member, over the subsets that contain it."""
    agree, total, taus = 0, 0, []
    for i in range(n):
        rows = [(est[s][s.index(i)], real[s][s.index(i)]) for s in real if i in s]
        e, r = np.array(rows).T
        for a, b in itertools.combinations(range(len(rows)), 2):
            if r[a] == r[b]:
                continue
            total += 1
            agree += int(np.sign(e[a] - e[b]) == np.sign(r[a] - r[b]))
        taus.append(kendalltau(e, r).statistic)
    return agree / total, float(np.nanmean(taus)), total


def pair_gains(
    single: dict[tuple[int, ...], np.ndarray],
    pair: dict[tuple[int, ...], np.ndarray],
    pairs: list[tuple[int, ...]],
    members: dict[tuple[int, ...], np.ndarray] | None = None,
) -> list[float]:
    """f_a({a}) - f_a({i, j}) for each member a of each pair, in the order (i, then j).

    ``single`` holds the losses on the single roles and ``pair`` those on the pairs; members
    whose single role is not in ``members`` (default: ``single``) are left out.
    """
    have = single if members is None else members
    return [single[(a,)][0] - pair[(i, j)][k] for i, j in pairs for k, a in enumerate((i, j)) if (a,) in have]


def ranking_scores(
    est: dict[tuple[int, ...], np.ndarray],
    real: dict[tuple[int, ...], np.ndarray],
    pairs: list[tuple[int, ...]],
    n: int,
) -> dict[str, Any]:
    """How one estimate ranks and levels the real losses on the subsets of ``real``."""
    agreement, tau, comparisons = within_member_order(est, real, n)
    e = np.concatenate([est[s] for s in real])
    r = np.concatenate([real[s] for s in real])
    return {
        "within_member_order_agreement": agreement,
        "order_comparisons": comparisons,
        "kendall_tau": tau,
        "relative_error": float(np.mean(np.abs(e - r) / r)),
        "pairwise_transfer_spearman_direct": float(
            spearmanr(pair_gains(est, est, pairs), pair_gains(real, real, pairs)).statistic
        ),
    }


def seed_noise(
    real: dict[tuple[int, ...], np.ndarray], replicate: dict[tuple[int, ...], np.ndarray], pairs: list[tuple[int, ...]]
) -> dict[str, float]:
    """How reproducible the real pair gains are, from each single role fine-tuned at a second seed.

    ``single_seed_noise_std``: the standard deviation of one fine-tuned validation loss over seeds
    (the RMS of the two seeds' difference over sqrt(2)); ``real_gain_std``: the spread of the real
    gains f_i({i}) - f_i({i, j}) over the 60 cases; ``real_gain_sign_reproducibility``: the share of
    cases whose gain has the same sign with the single role's other seed; ``real_gain_seed_spearman``:
    the Spearman of the gains computed with either seed of the single role.
    """
    singles = sorted(replicate)
    diff = np.array([real[s][0] - replicate[s][0] for s in singles])
    gain, gain_other = pair_gains(real, real, pairs, members=replicate), pair_gains(replicate, real, pairs)
    g, h = np.array(gain), np.array(gain_other)
    return {
        "single_seed_noise_std": float(np.sqrt(np.mean(diff**2) / 2)),
        "real_gain_std": float(g.std()),
        "real_gain_sign_reproducibility": float(np.mean(np.sign(g) == np.sign(h))),
        "real_gain_seed_spearman": float(spearmanr(g, h).statistic),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roles", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--calibration-subsets", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="the base length (estimation_error.py's 20)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--work", type=Path, default=RESULTS / "surrogate_ranking", help="one JSON per fine-tuned subset"
    )
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model name or path (tiny-random for a smoke run)")
    parser.add_argument(
        "--shard",
        default="0/1",
        help="K/N: fine-tune only subsets k with k %% N == K, so N one-thread processes (OMP_NUM_THREADS=1) "
        "share the cores; beside another busy process a two-thread run took 20 to 35 s per step, against 2.6 s "
        "at one thread alone, measured",
    )
    parser.add_argument(
        "--replicates",
        action="store_true",
        help="fine-tune every single role once more at another seed: the seed noise of the real losses, the ceiling "
        "on how well any estimate can order them",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where surrogate_ranking.{json,md} go")
    args = parser.parse_args()
    lengths = [args.steps * k for k in LENGTHS]
    shard, shards = (int(x) for x in args.shard.split("/"))
    if not 0 <= shard < shards:
        raise SystemExit(f"--shard {args.shard}: need K/N with 0 <= K < N")
    setup = ranking_setup(args.model, args.roles, args.batch_size, args.pairs, args.calibration_subsets)
    model_config, clients, model, plan = setup.model_config, setup.clients, setup.model, setup.plan
    train_batches, val_batches, theta_star = setup.train_batches, setup.val_batches, setup.theta_star
    n = len(clients)
    subsets = [s for kind in ("singles", "pairs", "calibration") for s in plan[kind]]
    # (subset, file suffix): the plan, then with --replicates every single role again at another seed
    jobs = [(s, "") for s in subsets] + [(s, "-replicate") for s in plan["singles"] if args.replicates]

    # Real fine-tuning, resumable: one file per finished subset.
    args.work.mkdir(parents=True, exist_ok=True)
    training = compute_context(model_config)
    finetune_s, loaded = 0.0, 0
    real: dict[int, dict[tuple[int, ...], np.ndarray]] = {t: {} for t in lengths}
    replicate: dict[int, dict[tuple[int, ...], np.ndarray]] = {t: {} for t in lengths}
    for k, (subset, suffix) in enumerate(jobs):
        path = job_path(args.work, subset, suffix)
        if not path.exists() and k % shards == shard:
            load_adapter_state(model, theta_star)
            measured: dict[str, list[float]] = {}

            def measure(step: int, subset: tuple[int, ...] = subset, measured: dict[str, list[float]] = measured):
                if step in lengths:
                    model.eval()
                    with torch.autocast("cpu", enabled=False):
                        measured[str(step)] = [float(evaluate_log_loss(model, val_batches[i]).mean()) for i in subset]

            start = time.perf_counter()
            with training:
                train_adapter(
                    model,
                    [b for i in subset for b in train_batches[i]],
                    max(lengths),
                    args.lr,
                    seed=k,  # a replicate's index differs from its original's: another batch order
                    after_step=measure,
                )
            seconds = time.perf_counter() - start
            path.write_text(json.dumps({"subset": list(subset), "losses": measured, "seconds": seconds}) + "\n")
            print(
                f"subset {k + 1}/{len(jobs)} {subset}{suffix}: {measured[str(max(lengths))]} ({seconds:.1f} s)",
                flush=True,
            )
        if not path.exists():
            continue  # another shard's
        stored = json.loads(path.read_text())
        if sorted(map(int, stored["losses"])) != lengths:
            raise SystemExit(f"{path} holds lengths {sorted(stored['losses'])}, not {lengths}: use another --work")
        finetune_s += stored["seconds"]
        loaded += 1
        for t in lengths:
            (replicate if suffix else real)[t][subset] = np.array(stored["losses"][str(t)])

    # Only what this loop loaded counts: another shard's subset that finished after the loop
    # passed it is not in real or replicate.
    if loaded < len(jobs):
        print(
            f"{loaded} of {len(jobs)} subsets fine-tuned; the others belong to other shards. Run again when they finish."
        )
        return

    # Sketches: one fp32 gradient pass over every train and validation sample.
    start = time.perf_counter()
    projector = JLProjector(gradient_dim(model), DIM, seed=0)
    load_adapter_state(model, theta_star)
    tasks = []
    for c, train, val in zip(clients, train_batches, val_batches, strict=True):
        t, v = sketch_batches(model, train, projector), sketch_batches(model, val, projector)
        tasks.append(TaskFeatures(c.client_id, t.outputs, t.features, v.outputs, v.features))
    sketch_s = time.perf_counter() - start
    base = np.array([float(torch.nn.functional.softplus(-t.val_outputs).mean()) for t in tasks])

    defaults = AffinityConfig()
    evaluated = plan["singles"] + plan["pairs"]
    results: dict[str, Any] = {}
    noise = {str(t): seed_noise(real[t], replicate[t], plan["pairs"]) for t in lengths if replicate[t]}
    for t in lengths:
        calibration = [(s, real[t][s]) for s in plan["calibration"]]
        for name, lam in (("default", defaults.lam), ("calibrated", calibrate_lambda(tasks, calibration, LAMBDA_GRID))):
            estimates = solve_subsets(tasks, evaluated, lam)
            est = {s: estimates.losses[k, : len(s)] for k, s in enumerate(evaluated)}
            real_t = {s: real[t][s] for s in evaluated}
            est_flat = np.concatenate([est[s] for s in evaluated])
            real_flat = np.concatenate([real_t[s] for s in evaluated])
            base_flat = np.concatenate([base[list(s)] for s in evaluated])
            affinity = affinity_from_features(tasks, defaults.subset_size, defaults.num_subsets, lam, defaults.seed)
            real_gain = pair_gains(real_t, real_t, plan["pairs"])
            claimed = [affinity.affinity[a, b] for i, j in plan["pairs"] for a, b in ((i, j), (j, i))]
            results[f"{t}/{name}"] = {
                "steps": t,
                "lambda_kind": name,
                "lambda": lam,
                **ranking_scores(est, real_t, plan["pairs"], n),
                "spearman_of_change": float(spearmanr(est_flat - base_flat, real_flat - base_flat).statistic),
                "mean_real_change": float(np.mean(real_flat - base_flat)),
                "pairwise_transfer_spearman": float(spearmanr(claimed, real_gain).statistic),
                "pairwise_cases": len(real_gain),
                "real_gain_positive_share": float(np.mean(np.array(real_gain) > 0)),
            }
            print(f"{t} steps, {name} lambda {lam:.3g}: {json.dumps(results[f'{t}/{name}'])}", flush=True)

    report = {
        "setup": {
            "model": args.model,
            "adapter": "LoRA r=4, alpha=8, q_proj,v_proj",
            "roles": [c.client_id for c in clients],
            "roles_skipped": f"the first {SKIP_ROLES}, by id, of the {SKIP_ROLES + n} largest",
            "seq_len": 32,
            "samples_per_role": "at most 40",
            "subsets": {kind: [list(s) for s in v] for kind, v in plan.items()},
            "finetune": f"{max(lengths)} Adam steps, lr {args.lr}, batch {args.batch_size}, loss log(1 + exp(-h)), "
            f"measured after {lengths} steps",
            "training_compute_dtype": resolve_compute_dtype(model_config),
            "sketch_dim": DIM,
            "affinity": {
                "subset_size": defaults.subset_size,
                "num_subsets": defaults.num_subsets,
                "default_lambda": defaults.lam,
            },
        },
        "finetune_s": finetune_s,
        "sketch_s": sketch_s,
        "within_member_order_agreement": {
            str(t): results[f"{t}/default"]["within_member_order_agreement"] for t in lengths
        },
        "pairwise_transfer_spearman": {str(t): results[f"{t}/default"]["pairwise_transfer_spearman"] for t in lengths},
        "by_length": results,
        "seed_noise": noise,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "surrogate_ranking.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# The surrogate's within-member ranking and pairwise transfer",
        "",
        f"{n} roles (the last {n}, by id, of the {SKIP_ROLES + n} largest), {len(plan['pairs'])} pairs and every single role, "
        f"d = {DIM}; written by `experiments/surrogate_ranking.py`. Chance order agreement is 0.5.",
        "",
        "| fine-tuning steps | lambda | order agreement | Kendall tau | Spearman of change | "
        "T vs real pair gain | direct estimate vs real pair gain |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results.values():
        lines.append(
            f"| {r['steps']} | {r['lambda_kind']} {r['lambda']:.2g} | {r['within_member_order_agreement']:.3f} | "
            f"{r['kendall_tau']:.3f} | {r['spearman_of_change']:.3f} | {r['pairwise_transfer_spearman']:.3f} | "
            f"{r['pairwise_transfer_spearman_direct']:.3f} |"
        )
    if noise:
        lines += [
            "",
            "Seed noise of the real fine-tuning (every single role fine-tuned again at another seed; `seed_noise`):",
            "",
            "| fine-tuning steps | one loss: seed std | real pair gain: std | gain sign reproduced | gain Spearman across seeds |",
            "| --- | --- | --- | --- | --- |",
        ]
        for t, r in noise.items():
            lines.append(
                f"| {t} | {r['single_seed_noise_std']:.4f} | {r['real_gain_std']:.4f} | "
                f"{r['real_gain_sign_reproducibility']:.3f} | {r['real_gain_seed_spearman']:.3f} |"
            )
    (args.results / "surrogate_ranking.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
