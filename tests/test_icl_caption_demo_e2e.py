"""End to end: the captioning demo recipe through the CLI, every stage, CIDEr for every method."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.lavis, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "recipes", "demo", "icl_caption.yaml")
QUERIES = 160


def test_caption_demo_runs_every_stage_and_reports_cider_per_method(tmp_path):
    sets = [
        f"run.output_dir={tmp_path / 'out'}", f"datasets.lever_coco_caption_icl.root={tmp_path / 'demo'}",
        f"run.beam_search.num_queries={QUERIES}", "run.beam_search.beam_size=2", "run.evaluation.num_queries=100",
        "run.max_epoch=20",
    ]
    done = subprocess.run([sys.executable, "-m", "lever_plugins.cli", "run", DEMO, *[a for s in sets for a in ("--set", s)]],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    beams = json.loads((out / "beam_search" / "beams.json").read_text())
    assert len(beams) == QUERIES and all(len(b["icds"]) == 2 for b in beams.values())
    rows = list(csv.DictReader(open(out / "evaluate" / "cider.csv")))
    cider = {(r["method"], int(r["shots"])): float(r["cider"]) for r in rows}
    assert set(cider) == {("zero_shot", 0), *((m, n) for m in ("random", "similarity", "pointer") for n in (1, 2))}
    assert all(int(r["num_queries"]) == 100 for r in rows)
    # The tiny LM never sees the image: zero-shot it cannot describe it, a demonstration of the same content can.
    assert cider[("pointer", 1)] > cider[("random", 1)] + 30 and cider[("pointer", 1)] > cider[("zero_shot", 0)] + 30
    assert (out / "evaluate" / "cider.png").is_file() and (out / "evaluate" / "cider.md").is_file()
    record = json.loads(open(out / "evaluate" / "predictions_pointer_1shot.jsonl").readline())
    assert len(record["demos"]) == 1 and record["prediction"]
