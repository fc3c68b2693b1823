"""Figures written into run directories."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np


def affinity_heatmap(affinity: np.ndarray, labels: np.ndarray, client_ids: list[str], path: Path) -> None:
    """The affinity matrix with clients ordered by group and group boundaries drawn."""
    order = np.argsort(labels, kind="stable")
    ordered = affinity[np.ix_(order, order)]
    size = min(12.0, 3.0 + 0.12 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size))
    limit = float(np.abs(ordered).max()) or 1.0
    image = ax.imshow(ordered, cmap="RdBu_r", vmin=-limit, vmax=limit)
    sorted_labels = labels[order]
    for edge in np.flatnonzero(np.diff(sorted_labels)) + 0.5:
        ax.axhline(edge, color="black", linewidth=1.2)
        ax.axvline(edge, color="black", linewidth=1.2)
    if len(labels) <= 60:
        names = [client_ids[i] for i in order]
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_title(f"task affinity, {len(labels)} clients in {len(set(labels.tolist()))} groups")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="gain over single-task estimate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
