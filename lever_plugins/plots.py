"""Per-epoch curves from a run's ``metrics.jsonl`` (matplotlib, imported only when drawing).

One reader of the metrics log and one panel renderer, for every task's after-training figure.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

from lever_plugins.io import atomic_output


def epoch_records(metrics_path: os.PathLike, split: str) -> list[dict]:
    """The per-epoch records of ``split`` (``train``, ``val``...) in a ``metrics.jsonl``, in file order."""
    records = []
    with open(metrics_path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if record.get("split") == split and isinstance(record.get("epoch"), int):
                    records.append(record)
    return records


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """``(epochs, values)`` of the finite numeric values of ``key``."""
    points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


class Panel:
    """One axis: the ``keys`` of ``records`` against the epoch, with optional reference lines ``{label: y}``."""

    def __init__(self, title: str, records: Sequence[dict], keys: Sequence[str], log_scale: bool = False,
                 reference_lines: Optional[dict[str, float]] = None, ylabel: str = "") -> None:
        self.title, self.records, self.keys = title, records, tuple(keys)
        self.log_scale, self.reference_lines, self.ylabel = log_scale, dict(reference_lines or {}), ylabel


def plot_panels(panels: Sequence[Panel], out_path: os.PathLike, suptitle: str = "") -> Path:
    """Draw the panels side by side and write the PNG atomically; returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.3 * len(panels), 3.4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, panel in zip(axes, panels):
        for key in panel.keys:
            epochs, values = series(panel.records, key)
            if epochs:
                axis.plot(epochs, values, marker="o", markersize=3, label=key)
        if panel.log_scale and axis.lines and all(v > 0 for line in axis.lines for v in line.get_ydata()):
            axis.set_yscale("log")
        for label, value in panel.reference_lines.items():
            axis.axhline(value, color="grey", linestyle="--", linewidth=1, label=label)
        axis.set_title(panel.title)
        axis.set_xlabel("epoch")
        if panel.ylabel:
            axis.set_ylabel(panel.ylabel)
        if axis.lines:
            axis.legend(fontsize=7)
    if suptitle:
        figure.suptitle(suptitle, fontsize=10)
    figure.tight_layout()
    out_path = Path(out_path)
    with atomic_output(out_path) as tmp_name:
        figure.savefig(tmp_name, dpi=110, format="png")
    return out_path


def plot_gate_opening(metrics_path: os.PathLike, out_path: os.PathLike) -> Optional[Path]:
    """How the gated-fusion plugin opens over training: ``alpha`` and the mean per-token gate per epoch
    (and their product, the effective scale of the update), beside the validation headline."""
    train = epoch_records(metrics_path, "train")
    if not any("gate_alpha" in r for r in train):
        return None
    for record in train:
        if isinstance(record.get("gate_alpha"), (int, float)) and isinstance(record.get("gate_mean"), (int, float)):
            record["alpha_x_gate"] = record["gate_alpha"] * record["gate_mean"]
    val = epoch_records(metrics_path, "val")
    panels = [
        Panel("alpha (update scale)", train, ("gate_alpha",), reference_lines={"identity (alpha = 0)": 0.0}),
        Panel("mean gate per token", train, ("gate_mean",)),
        Panel("effective update: alpha x gate", train, ("alpha_x_gate",)),
        Panel("validation", val, ("agg_metrics",), ylabel="headline metric"),
    ]
    return plot_panels(panels, out_path, suptitle="gated fusion: how far the gate opens")
