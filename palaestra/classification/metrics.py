"""Classification figures: accuracy, macro-F1 and the confusion matrix (scikit-learn's definitions), and its plot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["classification_figures", "confusion", "plot_confusion"]


def classification_figures(true: list[int], predicted: list[int], num_labels: int) -> dict[str, float]:
    """``accuracy`` (share right) and ``macro_f1`` (the unweighted mean of each label's F1; a label never
    predicted nor present scores 0, as scikit-learn's ``zero_division=0``).

    >>> classification_figures([0, 0, 1, 2], [0, 1, 1, 2], 3)
    {'accuracy': 0.75, 'macro_f1': 0.7777777777777777}
    """
    from sklearn.metrics import accuracy_score, f1_score

    labels = list(range(num_labels))
    return {"accuracy": float(accuracy_score(true, predicted)),
            "macro_f1": float(f1_score(true, predicted, labels=labels, average="macro", zero_division=0))}


def confusion(true: list[int], predicted: list[int], num_labels: int) -> np.ndarray:
    """Counts [num_labels, num_labels]: row = true label, column = predicted label.

    >>> confusion([0, 0, 1, 2], [0, 1, 1, 2], 3).tolist()
    [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    """
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(true, predicted, labels=list(range(num_labels)))


def plot_confusion(matrix: np.ndarray, labels: list[str], path: str | Path, title: str) -> Path:
    """The confusion matrix as a PNG (counts in the cells, shaded by the share of each true label's row)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    size = 2.5 + 0.7 * len(labels)
    fig = Figure(figsize=(size, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
