"""One task's (client's) rows for the surrogate (docs/METHOD.md §3): base outputs b and sketch features g.

``task_features`` reads them from a client's sketch. This is the only part of the surrogate
that needs ``elora_fed.sketch.client_sketch`` (and with it the model stack), so the solver
(``elora_fed.surrogate.subset_solver``), the statistics (``elora_fed.surrogate.statistics``) and the lambda
calibration (``elora_fed.surrogate.lambda_calibration``) import without peft or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elora_fed.errors import DataError
from elora_fed.sketch.client_sketch import ClientSketch


@dataclass(frozen=True)
class TaskFeatures:
    """One task's (client's) base outputs b and sketch features g: train rows and validation rows."""

    client_id: str
    train_outputs: torch.Tensor  # (n_i,)
    train_features: torch.Tensor  # (n_i, d)
    val_outputs: torch.Tensor  # (v_i,)
    val_features: torch.Tensor  # (v_i, d)

    def __post_init__(self) -> None:
        for split, outputs, features in (
            ("train", self.train_outputs, self.train_features),
            ("validation", self.val_outputs, self.val_features),
        ):
            if features.ndim != 2 or outputs.shape != features.shape[:1]:
                raise DataError(
                    f"client '{self.client_id}': {split} outputs {tuple(outputs.shape)} and features "
                    f"{tuple(features.shape)} do not match; expected shapes (n,) and (n, d)"
                )
            if len(outputs) == 0:
                raise DataError(
                    f"client '{self.client_id}' has no {split} rows; every task needs train rows to fine-tune on "
                    "and validation rows to estimate its loss"
                )
        if self.train_features.shape[1] != self.val_features.shape[1]:
            raise DataError(
                f"client '{self.client_id}': train features have d = {self.train_features.shape[1]} but "
                f"validation features have d = {self.val_features.shape[1]}"
            )

    @property
    def dim(self) -> int:
        return int(self.train_features.shape[1])


def task_features(sketch: ClientSketch) -> TaskFeatures:
    """The train and validation rows of one client's sketch, as float32 tensors."""
    train_b, train_g = sketch.rows("train")
    val_b, val_g = sketch.rows("validation")
    return TaskFeatures(
        client_id=sketch.client_id,
        train_outputs=torch.as_tensor(train_b, dtype=torch.float32),
        train_features=torch.as_tensor(train_g, dtype=torch.float32),
        val_outputs=torch.as_tensor(val_b, dtype=torch.float32),
        val_features=torch.as_tensor(val_g, dtype=torch.float32),
    )
