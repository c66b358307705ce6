"""A run's training_curves.png: loss and accuracy per epoch over both phases."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tlkit.core import selection
from tlkit.core.figures import new_figure, png_bytes
from tlkit.core.records import HistoryRow


def training_curves_png(rows: Sequence[HistoryRow]) -> bytes:
    """Loss and accuracy per epoch, train and validation, over both phases; a dashed line
    marks where fine-tuning starts, the best epoch (by the selection criterion,
    tlkit/core/selection.py) is circled."""
    x = list(range(1, len(rows) + 1))
    fig = new_figure(11, 4)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [r.get(prefix + metric, np.nan) for r in rows]
            ax.plot(
                x,
                values,
                style,
                marker="o",
                markersize=3,
                label=("validation " if prefix else "train ") + metric,
            )
        ax.set_xlabel("epoch (both phases)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    starts = [i for i in range(1, len(rows)) if rows[i]["phase"] != rows[i - 1]["phase"]]
    for ax in axes:
        for i in starts:
            ax.axvline(i + 0.5, color="gray", linestyle=":")
            ax.annotate(
                rows[i]["phase"],
                (i + 0.6, 0.98),
                xycoords=("data", "axes fraction"),
                va="top",
                fontsize=8,
                color="gray",
            )
        ax.annotate(
            rows[0]["phase"],
            (0.02, 0.98),
            xycoords="axes fraction",
            va="top",
            fontsize=8,
            color="gray",
        )
    best = selection.CRITERION.best_index(rows)
    axes[0].plot(
        [best + 1],
        [rows[best].get("val_loss", np.nan)],
        "o",
        markersize=10,
        fillstyle="none",
        color="black",
        label="best (saved)",
    )
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)
