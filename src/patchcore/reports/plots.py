"""Matplotlib figures of a category's results: score densities, confusion matrix, ROC and PR.

Every function returns the `matplotlib.figure.Figure` it drew (tests inspect axis labels);
`save_figure` writes one to PNG and closes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

SCORE_LABEL = "anomaly score"


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write `fig` as PNG to `path` (parents created) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def density_plot(
    scores: np.ndarray, labels: np.ndarray, threshold: float | None, title: str = ""
) -> Figure:
    """Histograms (density) of good and anomalous scores with the image threshold as a line."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = np.histogram_bin_edges(scores, bins=min(40, max(10, len(scores) // 3)))
    for value, name, colour in ((0, "good", "tab:green"), (1, "anomalous", "tab:red")):
        part = scores[labels == value]
        if len(part):
            ax.hist(part, bins=bins, density=True, alpha=0.55, color=colour,
                    label=f"{name} (n={len(part)})")
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel(SCORE_LABEL)
    ax.set_ylabel("density")
    ax.set_title(title or "Score distribution")
    ax.legend(fontsize=8)
    return fig


def confusion_plot(labels: np.ndarray, predicted: np.ndarray, title: str = "") -> Figure:
    """Confusion matrix (sklearn ConfusionMatrixDisplay) of true vs predicted image labels."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ConfusionMatrixDisplay.from_predictions(
        np.asarray(labels), np.asarray(predicted), labels=[0, 1],
        display_labels=["good", "anomalous"], ax=ax, colorbar=False, cmap="Blues",
    )
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title or "Confusion matrix at the threshold")
    return fig


def _one_class(labels: np.ndarray) -> bool:
    return len(np.unique(labels)) < 2


def roc_plot(labels: np.ndarray, scores: np.ndarray, title: str = "") -> Figure:
    """ROC curve with its AUROC in the legend (a note instead when only one class is present)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    if _one_class(labels):
        ax.text(0.5, 0.5, "undefined: one class only", ha="center", va="center")
    else:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"AUROC {roc_auc_score(labels, scores):.4f}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.legend(loc="lower right")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC curve")
    return fig


def pr_plot(
    labels: np.ndarray, scores: np.ndarray, threshold: float | None = None, title: str = ""
) -> Figure:
    """Precision-recall curve, with the operating point at `threshold` marked."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    labels = np.asarray(labels)
    scores = np.asarray(scores)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    if not labels.any():
        ax.text(0.5, 0.5, "undefined: no anomalous images", ha="center", va="center")
    else:
        precision, recall, _ = precision_recall_curve(labels, scores)
        ax.plot(recall, precision, label=f"AP {average_precision_score(labels, scores):.4f}")
        if threshold is not None and math.isfinite(threshold):
            pred = scores >= threshold
            tp = int((pred & (labels == 1)).sum())
            p = tp / max(int(pred.sum()), 1)
            r = tp / max(int(labels.sum()), 1)
            ax.scatter([r], [p], color="black", zorder=3, label="at threshold")
        ax.legend(loc="lower left")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "Precision-recall curve")
    return fig


def strip_plot(
    scores: np.ndarray, groups: Sequence[str], threshold: float | None = None,
    order: Sequence[str] | None = None, seed: int = 0,
) -> Figure:
    """Scores of each group as jittered points, one column per group."""
    scores = np.asarray(scores, dtype=np.float64)
    groups = list(groups)
    names = list(order) if order is not None else sorted(set(groups))
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 1.1 * len(names)), 4.2))
    for x, name in enumerate(names):
        part = scores[[g == name for g in groups]]
        ax.scatter(x + rng.uniform(-0.25, 0.25, len(part)), part, s=12, alpha=0.7)
    if threshold is not None and math.isfinite(threshold):
        ax.axhline(threshold, color="black", linestyle="--", label="threshold")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_xlabel("group")
    ax.set_ylabel(SCORE_LABEL)
    ax.set_title("Scores per group")
    return fig


def group_density_plot(scores: np.ndarray, groups: Sequence[str]) -> Figure:
    """Overlaid score histograms (density), one per group."""
    scores = np.asarray(scores, dtype=np.float64)
    groups = list(groups)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = np.histogram_bin_edges(scores, bins=30)
    for name in sorted(set(groups)):
        part = scores[[g == name for g in groups]]
        ax.hist(part, bins=bins, density=True, alpha=0.4, label=f"{name} (n={len(part)})",
                histtype="stepfilled")
    ax.set_xlabel(SCORE_LABEL)
    ax.set_ylabel("density")
    ax.set_title("Score distribution per group")
    ax.legend(fontsize=7)
    return fig
