"""Do the sketch-space estimates predict real fine-tuning? The paper's Table 3, here.

Setup: SmolLM2-135M (fp32), LoRA r = 4 on q, v, the 20 largest Shakespeare roles (32-token
samples, at most 40 per role), random subsets of 3 to 5 roles. For every subset S an adapter
is really fine-tuned from theta* on the union of its roles' training samples for a fixed
number of Adam steps, and each member's validation loss log(1 + exp(-h)) is measured. The
surrogate (``elora_fed.surrogate.subset_solver``) estimates the same losses from the sketches alone, at
d = 200, 400 and 800. lambda is calibrated on separate calibration subsets (reported).

Reported per d: the mean relative error |f^ - f| / f over every (subset, member) pair, the
Spearman correlation of f^ with f over those pairs, and, because a large part of f is the
role's loss before fine-tuning, the Spearman correlation of the estimated change
f^ - f(theta*) with the real change f - f(theta*). The error of predicting "no change" is
reported as the baseline. Wall-clock: estimation (gradient pass, projection, calibration,
solves) against real fine-tuning of the same subsets, measured in the same run.

    python experiments/estimation_error.py [--subsets 30] [--steps 20]

Writes experiments/results/estimation_error.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from elora_fed.data.config import DataConfig
from elora_fed.data.federated_data import load_lm_clients
from elora_fed.model.adapters import adapter_state, attach_lora, load_adapter_state
from elora_fed.model.batches import Batch, lm_batch
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import EMBEDDED_MODEL, load_base_model, load_tokenizer
from elora_fed.model.training import evaluate_log_loss, train_adapter
from elora_fed.sketch.gradients import gradient_dim, per_sample_gradients
from elora_fed.sketch.projection import JLProjector
from elora_fed.surrogate.lambda_calibration import calibrate_lambda, calibration_errors
from elora_fed.surrogate.subset_solver import solve_subsets
from elora_fed.surrogate.task_features import TaskFeatures

RESULTS = Path(__file__).parent / "results"
ADAPTER = AdapterConfig(rank=4, alpha=8, target_modules="q_proj,v_proj", seed=0)
LAMBDA_GRID = [float(x) for x in np.logspace(-4, 1, 21)]


def batches_of(tokens: np.ndarray, size: int) -> list[Batch]:
    return [lm_batch(tokens[i : i + size]) for i in range(0, len(tokens), size)]


def random_subsets(n: int, count: int, rng: np.random.RandomState) -> list[tuple[int, ...]]:
    return [tuple(sorted(rng.choice(n, size=rng.randint(3, 6), replace=False).tolist())) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roles", type=int, default=20)
    parser.add_argument("--subsets", type=int, default=30)
    parser.add_argument("--calibration-subsets", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dims", default="200,400,800")
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    model_config = ModelConfig(name=EMBEDDED_MODEL)
    tokenizer = load_tokenizer(model_config)
    data = load_lm_clients(DataConfig(seq_len=32, num_clients=args.roles, max_samples_per_client=40), tokenizer)
    clients = data.clients
    model = attach_lora(load_base_model(model_config), ADAPTER)
    theta_star = adapter_state(model)
    val_batches = [batches_of(c.splits["validation"], args.batch_size) for c in clients]
    train_batches = [batches_of(c.splits["train"], args.batch_size) for c in clients]

    # Estimation, part 1: one gradient pass over every train and validation sample.
    start = time.perf_counter()
    gradients = []
    for train, val in zip(train_batches, val_batches, strict=True):
        pieces = [per_sample_gradients(model, b) for b in train + val]
        n_train = sum(len(b) for b in train)
        h = torch.cat([p[0] for p in pieces])
        g = torch.cat([p[1] for p in pieces])
        gradients.append((h[:n_train], g[:n_train], h[n_train:], g[n_train:]))
    gradient_pass_s = time.perf_counter() - start
    base_losses = [float(torch.nn.functional.softplus(-hv).mean()) for _, _, hv, _ in gradients]
    print(f"gradient pass: {gradient_pass_s:.1f} s for {sum(len(g[0]) + len(g[2]) for g in gradients)} samples")

    # Real fine-tuning of calibration and evaluation subsets.
    rng = np.random.RandomState(0)
    subsets = random_subsets(len(clients), args.calibration_subsets + args.subsets, rng)
    real: list[np.ndarray] = []
    finetune_s = []
    for k, subset in enumerate(subsets):
        load_adapter_state(model, theta_star)
        start = time.perf_counter()
        train_adapter(model, [b for i in subset for b in train_batches[i]], args.steps, args.lr, seed=k)
        finetune_s.append(time.perf_counter() - start)
        real.append(np.array([float(evaluate_log_loss(model, val_batches[i]).mean()) for i in subset]))
        print(
            f"subset {k + 1}/{len(subsets)} {subset}: real {np.round(real[-1], 4)} ({finetune_s[-1]:.1f} s)", flush=True
        )
    calibration = list(zip(subsets[: args.calibration_subsets], real[: args.calibration_subsets], strict=True))
    evaluation = list(zip(subsets[args.calibration_subsets :], real[args.calibration_subsets :], strict=True))
    real_eval = np.concatenate([r for _, r in evaluation])
    base_eval = np.concatenate([[base_losses[i] for i in s] for s, _ in evaluation])
    finetune_eval_s = float(sum(finetune_s[args.calibration_subsets :]))

    by_dim = {}
    for d in dims:
        start = time.perf_counter()
        projector = JLProjector(gradient_dim(model), d, seed=0)
        tasks = [
            TaskFeatures(c.client_id, ht, projector.project(gt), hv, projector.project(gv))
            for c, (ht, gt, hv, gv) in zip(clients, gradients, strict=True)
        ]
        project_s = time.perf_counter() - start
        start = time.perf_counter()
        lam = calibrate_lambda(tasks, calibration, LAMBDA_GRID)
        errors_over_grid = calibration_errors(tasks, calibration, LAMBDA_GRID)
        calibrate_s = time.perf_counter() - start
        start = time.perf_counter()
        estimates = solve_subsets(tasks, [s for s, _ in evaluation], lam)
        solve_s = time.perf_counter() - start
        est = np.concatenate([estimates.losses[k, : len(s)] for k, (s, _) in enumerate(evaluation)])
        estimation_s = gradient_pass_s + project_s + calibrate_s + solve_s
        by_dim[str(d)] = {
            "relative_error": float(np.mean(np.abs(est - real_eval) / real_eval)),
            "spearman": float(spearmanr(est, real_eval).statistic),
            "spearman_of_change": float(spearmanr(est - base_eval, real_eval - base_eval).statistic),
            "lambda": lam,
            "calibration_error_by_lambda": dict(zip(map(str, LAMBDA_GRID), errors_over_grid.tolist(), strict=True)),
            "seconds": {
                "gradient_pass": gradient_pass_s,
                "projection": project_s,
                "calibration": calibrate_s,
                "solve": solve_s,
            },
            "estimation_s": estimation_s,
            "speedup_vs_finetune": finetune_eval_s / estimation_s,
        }
        print(f"d={d}: {json.dumps({k: v for k, v in by_dim[str(d)].items() if k != 'calibration_error_by_lambda'})}")
    report = {
        "setup": {
            "model": EMBEDDED_MODEL,
            "adapter": "LoRA r=4, alpha=8, q_proj,v_proj",
            "roles": [c.client_id for c in clients],
            "seq_len": 32,
            "samples_per_role": "at most 40 (32 train / 4 validation / 4 test)",
            "subsets": [list(s) for s, _ in evaluation],
            "calibration_subsets": [list(s) for s, _ in calibration],
            "finetune": f"{args.steps} Adam steps, lr {args.lr}, batch {args.batch_size}, loss log(1 + exp(-h))",
        },
        "pairs": len(real_eval),
        "no_change_baseline_relative_error": float(np.mean(np.abs(base_eval - real_eval) / real_eval)),
        "mean_real_change": float(np.mean(real_eval - base_eval)),
        "finetune_s": finetune_eval_s,
        "speedup_vs_finetune": by_dim[str(400)]["speedup_vs_finetune"] if "400" in by_dim else None,
        **by_dim,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "estimation_error.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Estimated vs real fine-tuned validation loss ({len(evaluation)} subsets, {len(real_eval)} pairs)",
        "",
        "| d | lambda | relative error | Spearman | Spearman of the change | estimation s | fine-tuning s | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d, r in by_dim.items():
        lines.append(
            f"| {d} | {r['lambda']:.2g} | {100 * r['relative_error']:.2f}% | {r['spearman']:.3f} | "
            f"{r['spearman_of_change']:.3f} | {r['estimation_s']:.1f} | {finetune_eval_s:.1f} | {r['speedup_vs_finetune']:.1f}x |"
        )
    lines += ["", f"Predicting no change: relative error {100 * report['no_change_baseline_relative_error']:.2f}%."]
    (RESULTS / "estimation_error.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
