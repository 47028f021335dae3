"""The end-of-run summary every task prints: best epoch and its val metrics, test results, where it all is.

Built from the run's metric records (``metrics.jsonl``), so a resumed run summarises its whole history.
Pure Python.
"""
from __future__ import annotations

import datetime
import math
from typing import Iterable, Optional, Sequence

MAX_METRICS_SHOWN = 14  # headline first; the full set is in metrics.csv
_NOT_METRICS = {"epoch", "split", "best_epoch"}


def _metric_items(record: dict) -> list[tuple[str, float]]:
    items = [(k, float(v)) for k, v in record.items()
             if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    items.sort(key=lambda item: item[0] != "agg_metrics")  # stable: the headline first, then the task's order
    return items


def _table(rows: Sequence[tuple[str, float]]) -> list[str]:
    shown = list(rows[:MAX_METRICS_SHOWN])
    width = max((len(k) for k, _ in shown), default=0)
    lines = [f"    {key:<{width}}  {value:10.4f}" for key, value in shown]
    if len(rows) > len(shown):
        lines.append(f"    ... {len(rows) - len(shown)} more in metrics.csv")
    return lines


def run_summary(records: Iterable[dict], output_dir: str, wall_seconds: float,
                valid_split: str = "val", test_splits: Sequence[str] = ()) -> str:
    """A few lines a person reads at the end of a run.

    Epochs are numbered from 0, as in ``metrics.csv`` and the logs; the number of epochs is given too.
    """
    records = list(records)
    train_epochs = sorted({r["epoch"] for r in records if r.get("split") == "train" and isinstance(r.get("epoch"), int)})
    val = [r for r in records if r.get("split") == valid_split and isinstance(r.get("epoch"), int)]
    lines = ["", "== run summary " + "=" * 50]
    if train_epochs:
        lines.append(f"  trained {len(train_epochs)} epoch(s), numbered {train_epochs[0]}-{train_epochs[-1]} "
                     "(as in metrics.csv and the logs)")
    best: Optional[dict] = None
    if val:
        best = max(val, key=lambda r: r.get("agg_metrics", float("-inf")))
        lines.append(f"  best epoch {best['epoch']} on {valid_split} (checkpoint_best.pth):")
        lines += _table(_metric_items(best))
    evaluated = [r for r in records if r.get("epoch") == "evaluate"]
    for record in evaluated:
        lines.append(f"  evaluated on {record['split']}:")
        lines += _table(_metric_items(record))
    for split in test_splits:
        tests = [r for r in records if r.get("split") == split and not isinstance(r.get("epoch"), int)]
        if not tests:
            continue
        record = tests[-1]
        if record.get("submission"):
            lines.append(f"  {split}: no labels; submission files written to {record['submission']}")
        else:
            lines.append(f"  {split} (with the {record.get('epoch')} checkpoint):")
            lines += _table(_metric_items(record))
    lines.append(f"  output folder: {output_dir}")
    lines.append(f"  wall time: {datetime.timedelta(seconds=int(round(wall_seconds)))}")
    lines.append("=" * 65)
    return "\n".join(lines)
