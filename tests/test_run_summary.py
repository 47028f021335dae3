"""The end-of-run summary: best epoch and its val metrics, test results or submission files, folder, time."""
from __future__ import annotations

from lever_plugins.runners.summary import MAX_METRICS_SHOWN, run_summary

RECORDS = [
    {"epoch": 0, "split": "train", "loss": 2.0},
    {"epoch": 0, "split": "val", "recall_at5": 40.0, "agg_metrics": 41.0, "best_epoch": 0},
    {"epoch": 1, "split": "train", "loss": 1.5},
    {"epoch": 1, "split": "val", "recall_at5": 55.5, "agg_metrics": 52.25, "best_epoch": 1},
    {"epoch": 2, "split": "train", "loss": 1.2},
    {"epoch": 2, "split": "val", "recall_at5": 50.0, "agg_metrics": 49.0, "best_epoch": 1},
]


def test_summary_names_the_best_epoch_and_its_metrics_headline_first():
    text = run_summary(RECORDS, "/runs/demo", 125.4)
    lines = text.splitlines()
    assert "trained 3 epoch(s), numbered 0-2 (as in metrics.csv and the logs)" in text
    assert "best epoch 1 on val (checkpoint_best.pth):" in text
    first, second = [line.split() for line in lines[lines.index("  best epoch 1 on val (checkpoint_best.pth):") + 1:][:2]]
    assert first == ["agg_metrics", "52.2500"] and second == ["recall_at5", "55.5000"]
    assert "best_epoch" not in text.split("best epoch 1")[1].split("output folder")[0]
    assert "output folder: /runs/demo" in text and "wall time: 0:02:05" in text


def test_unlabelled_test_split_points_to_the_submission_files_and_labelled_one_shows_metrics():
    records = RECORDS + [
        {"epoch": "best", "split": "test1", "submission": "/runs/demo/result/recall_test1.json, /runs/demo/result/subset.json"},
        {"epoch": "best", "split": "test", "rsum": 480.0, "agg_metrics": 480.0},
    ]
    text = run_summary(records, "/runs/demo", 1.0, test_splits=["test1", "test"])
    assert "test1: no labels; submission files written to /runs/demo/result/recall_test1.json" in text
    assert "agg_metrics=0" not in text and "test (with the best checkpoint):" in text
    assert "rsum" in text.split("test (with the best checkpoint):")[1]


def test_long_metric_lists_are_cut_with_a_pointer_to_metrics_csv():
    many = {f"m{i:02d}": float(i) for i in range(MAX_METRICS_SHOWN + 5)}
    text = run_summary([{"epoch": 0, "split": "val", "agg_metrics": 1.0, **many}], "/x", 0)
    assert "... 6 more in metrics.csv" in text


def test_evaluate_only_run():
    text = run_summary([{"epoch": "evaluate", "split": "val", "agg_metrics": 3.0}], "/x", 0)
    assert "evaluated on val:" in text and "best epoch" not in text and "trained" not in text
