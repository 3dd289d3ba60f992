"""Out-of-distribution analysis of a test set with several (possibly nested) groups.

For `folder` layouts such as test/good, test/syn/batch1, test/syn/batch2, test/real: per-group
score distributions, a strip plot, the AUROC of each group (and of each parent folder of nested
groups) against the normal group, and a grid of sample images ordered by score.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from .html import data_table, embed_file, img_tag
from .plots import group_density_plot, save_figure, strip_plot

OOD_COLUMNS = ("group", "n", "mean_score", "median_score", "auroc_vs_normal", "flagged_share")


def group_names(groups: Sequence[str], normal: str = "good") -> list[str]:
    """Leaf groups plus every parent folder of nested groups (a/b/c -> a, a/b), normal first."""
    names: set[str] = set()
    for g in groups:
        parts = g.split("/")
        for k in range(1, len(parts) + 1):
            names.add("/".join(parts[:k]))
    return sorted(names, key=lambda n: (n != normal, n))


def _members(groups: Sequence[str], name: str) -> np.ndarray:
    return np.array([g == name or g.startswith(name + "/") for g in groups])


def group_table(
    scores: np.ndarray, groups: Sequence[str], normal: str = "good",
    threshold: float | None = None,
) -> list[dict[str, Any]]:
    """One row per group: count, mean/median score, AUROC vs the normal group, flagged share."""
    scores = np.asarray(scores, dtype=np.float64)
    normal_mask = _members(groups, normal)
    rows = []
    for name in group_names(groups, normal):
        mask = _members(groups, name)
        part = scores[mask]
        auroc = math.nan
        if name != normal and normal_mask.any() and len(part):
            y = np.r_[np.zeros(int(normal_mask.sum())), np.ones(len(part))]
            auroc = float(roc_auc_score(y, np.r_[scores[normal_mask], part]))
        flagged = float(np.mean(part >= threshold)) if threshold is not None else math.nan
        rows.append({"group": name, "n": int(len(part)), "mean_score": float(part.mean()),
                     "median_score": float(np.median(part)), "auroc_vs_normal": auroc,
                     "flagged_share": flagged})
    return rows


def sample_grid(
    paths: Sequence[Path], scores: np.ndarray, groups: Sequence[str], n: int = 24,
    columns: int = 6,
) -> Any:
    """Figure: up to `n` images spread evenly over the score ranking, lowest score first."""
    import matplotlib.pyplot as plt

    from .thumbs import image_thumbnail

    order = np.argsort(np.asarray(scores))
    pick = order[np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))]
    rows = -(-len(pick) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), pick, strict=False):
        ax.imshow(image_thumbnail(paths[i], 160))
        ax.set_title(f"{groups[i]}\n{scores[i]:.3f}", fontsize=7)
    fig.suptitle("Samples ordered by anomaly score (low to high)")
    return fig


def ood_report(pred: Any, folder: Path, normal: str = "good",
               threshold: float | None = None) -> tuple[list[dict[str, Any]], str]:
    """Write ood_groups.csv and the OOD plots into `folder`; return the rows and an HTML section."""
    folder.mkdir(parents=True, exist_ok=True)
    groups = list(pred.groups)
    rows = group_table(pred.scores, groups, normal, threshold)
    with open(folder / "ood_groups.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(OOD_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    leaves = sorted(set(groups), key=lambda n: (n != normal, n))
    save_figure(strip_plot(pred.scores, groups, threshold, order=leaves), folder / "ood_strip.png")
    save_figure(group_density_plot(pred.scores, groups), folder / "ood_density.png")
    save_figure(sample_grid(pred.paths, pred.scores, groups), folder / "ood_samples.png")
    table = data_table(list(OOD_COLUMNS), [[r[c] for c in OOD_COLUMNS] for r in rows])
    imgs = "".join(img_tag(embed_file(folder / f), f)
                   for f in ("ood_strip.png", "ood_density.png", "ood_samples.png"))
    return rows, f"{table}<div class='plots'>{imgs}</div>"
