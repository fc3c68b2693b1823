"""A worked example of replacing a whole phase: train, move each client to its best group, retrain.

A phase is a class built as ``Class(run, fed)`` whose ``steps()`` yields requests and
receives their replies (``strategies/phase.py``); it reads and writes the run state
(``strategies/run_state.py``) and reuses the toolkit's phases and helpers with ``yield from``.
This one fills the ``train`` slot:

1. the usual federated training of one adapter per affinity group (``TrainingPhase``);
2. every client scores every group's adapter on its validation split (one exchange), and
   moves to the group whose adapter gives it the lowest loss;
3. if any client moved, the groups are retrained from theta* with the new membership.

It is resumable like the built-in phases: the reassignment is checkpointed, so a run
killed in step 3 resumes inside the retraining. Use it with

    elora-fed run --preset demo --set strategies.train=experiments/custom_phase.py:ReassignAndRetrain

Training costs up to twice the default's; ``reassigned_groups.json`` records the moves.
"""

from __future__ import annotations

import shutil

import numpy as np

from elora_fed.ensemble.outputs import GroupAdapters
from elora_fed.run_dir import adapter_dir, adapter_name, write_json
from strategies.evaluation import evaluate
from strategies.federation import Federation
from strategies.messaging import exchange_metrics
from strategies.phase import Steps
from strategies.run_state import RunState
from strategies.training import TrainingPhase


class ReassignAndRetrain:
    """Train, reassign every client to the group whose adapter fits its validation data best, retrain."""

    def __init__(self, run: RunState, fed: Federation) -> None:
        self.run, self.fed = run, fed

    def steps(self) -> Steps[None]:
        run = self.run
        if "reassigned" not in run.info:
            yield from TrainingPhase(run, self.fed).steps()
            moved = yield from self.reassign()
            if not moved:
                return
        yield from TrainingPhase(run, self.fed).steps()

    def reassign(self) -> Steps[int]:
        """Move each client to its lowest-validation-loss group; returns how many clients moved."""
        run, fed = self.run, self.fed
        groups = run.groups()
        adapters = {g: GroupAdapters(run.snapshot.adapters[adapter_name(g)]) for g in groups}
        uniform = [1 / len(groups)] * len(groups)
        per_client, result = yield from evaluate(
            fed, "reassign: validation", "validation", {c: adapters for c in fed.client_ids},
            {c: uniform for c in fed.client_ids},
        )  # fmt: skip
        order = list(groups)
        old = dict(zip(run.info["client_ids"], run.info["labels"], strict=True))
        # A client whose evaluation failed keeps its group.
        best = {c: order[int(np.argmin(per_client[c]["group_loss"]))] if c in per_client else old[c] for c in old}
        kept = sorted(set(best.values()))  # groups nobody chose disappear; renumber from 0
        labels = [kept.index(best[c]) for c in run.info["client_ids"]]
        moved = sum(best[c] != old[c] for c in old)
        run.info["reassigned"] = moved
        if moved:  # retraining starts afresh, from theta*
            run.info["labels"] = labels
            for key in ("train_round", "train_stopped", "validation_best"):
                run.info.pop(key, None)
            for g in groups:
                run.snapshot.adapters.pop(adapter_name(g), None)
                shutil.rmtree(adapter_dir(run.dir, g), ignore_errors=True)
        run.log({"phase": "reassign", "moved": moved, "groups": len(kept), **exchange_metrics(result)})
        write_json(
            run.dir / "reassigned_groups.json",
            {
                "moved": moved,
                "before": old,
                "after": dict(zip(run.info["client_ids"], labels, strict=True)),
                "validation_group_loss": {
                    c: dict(zip(order, r["group_loss"], strict=True)) for c, r in per_client.items()
                },
            },
        )
        run.save()
        return moved
