"""EnsembleLoRA against its baselines on BIG-bench's ten classification tasks; resumable.

The paper's main setting, offline: one client per task (``elora-fed run --preset bigbench``,
set up once with ``elora-fed fetch-data --bigbench``), SmolLM2-135M-Instruct with LoRA r=4,
prompts of at most 128 tokens, at most 250 samples per task (200 train, 25 validation, 25
test for a task of 2,000; each split keeps its label mix). 5 local steps of 8 samples per
round (a fifth of a local epoch), one learning rate (0.005) for the validation curve, as for
Shakespeare: a second curve would cost about two runs on 2 CPU cores.
Methods, 3 seeds each: EnsembleLoRA, one adapter, random groups (EnsembleLoRA's m),
per-task adapters (``local``) and MTL-FT; then nf4 QLoRA for EnsembleLoRA and one adapter.

Accuracy is the argmax over a task's label words, averaged over tasks. Beside the
runner's report (``experiments/converged.py``) the JSON gets ``tasks``, per method and
task the accuracy's mean and std (``per_task``), ``majority_accuracy`` (the most frequent
train label, scored on the same test samples), and ``accuracy_change_vs_*`` in points.
The paired intervals (``paired_ci_vs_*``) are over tasks, in accuracy.

    python experiments/classification_report.py [--seeds 0 1 2] [--stage all|curve|report]
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from converged import Experiment, Run, main

from elora_fed.config import PRESETS, RunConfig
from elora_fed.data.classification import cap_samples, load_classification_tasks


def majority_accuracy(protocol: dict[str, Any]) -> dict[str, float]:
    """Per task: the test accuracy of always answering its most frequent train label."""
    data = RunConfig.from_flat(protocol).data  # typed and validated, as every run's config
    out = {}
    for task in load_classification_tasks(data.path, data.val_fraction, data.test_fraction):
        capped = cap_samples(task, data.max_samples_per_client)
        label = Counter(y for _, y in capped.splits["train"]).most_common(1)[0][0]
        out[task.name] = float(np.mean([y == label for _, y in capped.splits["test"]]))
    return out


def per_task(by_method: dict[str, list[Run]], out: dict[str, Any]) -> None:
    """The classification entries of the report (see the module docstring)."""
    tasks = sorted({c["client_id"] for rs in by_method.values() for r in rs for c in r["clients"]})
    out["tasks"] = tasks
    out["per_task"] = {
        name: {
            task: {
                "mean": float(np.mean(v)),
                "std": float(np.std(v)),
                "n": len(v),
            }
            for task in tasks
            if (v := [c["test_accuracy"] for r in rs for c in r["clients"] if c["client_id"] == task])
        }
        for name, rs in by_method.items()
    }
    out["majority_accuracy"] = majority_accuracy(out["protocol"])
    out["majority_accuracy_mean"] = float(np.mean(list(out["majority_accuracy"].values())))
    for name in ("qlora", "random", "mtlft"):
        seeds = out.get(f"seeds_vs_{name}")
        method = "mtl-ft" if name == "mtlft" else name
        if seeds:
            ens = [
                r["average"]["ensemble"]["test_accuracy"]
                for r in by_method["ensemble"]
                if r["settings"]["seed"] in seeds
            ]
            ref = [
                r["average"]["ensemble"]["test_accuracy"] for r in by_method[method] if r["settings"]["seed"] in seeds
            ]
            out[f"accuracy_change_vs_{name}"] = 100 * (float(np.mean(ens)) - float(np.mean(ref)))


BIGBENCH = Experiment(
    name="classification_report",
    title="BIG-bench classification at a converged budget",
    script="experiments/classification_report.py",
    protocol={**PRESETS["bigbench"], "train.local_steps": 5, "train.batch_size": 8},
    curve_lrs=(0.005,),
    curve_rounds=16,
    finetune_steps=25,  # MTL-FT: one local epoch of 200 train samples
    core=("ensemble", "qlora", "random", "local", "mtl-ft"),
    extra=(),
    metric="test_accuracy",
    extend=per_task,
)

if __name__ == "__main__":
    main(BIGBENCH)
