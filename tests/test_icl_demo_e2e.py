"""End to end: the demo recipe through the CLI, killed during beam search, resumed, and evaluated."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = [pytest.mark.lavis, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "recipes", "demo", "icl_pointer.yaml")
QUERIES = 240


def _args(tmp_path, *extra):
    return [
        sys.executable, "-m", "lever_plugins.cli", "run", DEMO,
        "--set", f"run.output_dir={tmp_path / 'out'}",
        "--set", f"datasets.lever_vqa_icl.root={tmp_path / 'demo'}",
        "--set", f"run.beam_search.num_queries={QUERIES}",
        "--set", "run.beam_search.pool_size=16", "--set", "model.K=16", "--set", "run.beam_search.beam_size=2",
        "--set", "run.evaluation.num_queries=100", "--set", "run.max_epoch=30",
        *extra,
    ]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def test_demo_pipeline_survives_a_kill_and_the_selector_beats_random_and_zero_shot(tmp_path):
    part = tmp_path / "out" / "beam_search" / "beams.part0.jsonl"
    process = subprocess.Popen(_args(tmp_path), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 400
    while time.time() < deadline and process.poll() is None:
        if part.is_file() and part.read_text().count("\n") >= 40:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    os.kill(process.pid, signal.SIGKILL)  # a hard kill in the middle of beam search
    process.wait()
    process.stderr.close()
    before = part.read_text().splitlines(keepends=True)
    finished_before = [line for line in before if line.endswith("\n")]
    assert 40 <= len(finished_before) < QUERIES

    again = subprocess.run(_args(tmp_path), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # an existing run is never overwritten silently

    resumed = subprocess.run(_args(tmp_path, "--resume"), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    lines = part.read_text().splitlines()
    ids = [json.loads(line)["question_id"] for line in lines]
    assert len(ids) == len(set(ids)) == QUERIES  # nothing lost, nothing done twice
    assert [line + "\n" for line in lines[:len(finished_before)]] == finished_before
    beams = json.loads((tmp_path / "out" / "beam_search" / "beams.json").read_text())
    pools = json.loads((tmp_path / "out" / "beam_search" / "pools.json").read_text())
    assert len(beams) == QUERIES and all(len(pools[q]) == 16 and len(b["icds"]) == 2 for q, b in beams.items())
    # Every kept beam (beam_size 2), best first, for training with train_on: all (the default).
    everything = json.loads((tmp_path / "out" / "beam_search" / "beams_all.json").read_text())
    assert set(everything) == set(beams) and all(len(everything[q]) == 2 and everything[q][0] == beams[q] for q in beams)

    out = tmp_path / "out"
    val = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["split"] == "val"]
    chance_top1 = 100 * (1 / 16 + 1 / 15) / 2
    assert max(float(r["top1"]) for r in val) > 3 * chance_top1
    accuracy = {(r["method"], int(r["shots"])): float(r["accuracy"]) for r in csv.DictReader(open(out / "evaluate" / "vqa_accuracy.csv"))}
    assert set(accuracy) == {("zero_shot", 0), *((m, n) for m in ("random", "similarity", "pointer") for n in (1, 2))}
    assert accuracy[("pointer", 1)] > accuracy[("random", 1)] + 30
    assert accuracy[("pointer", 1)] > accuracy[("zero_shot", 0)] + 30
    assert (out / "evaluate" / "vqa_accuracy.png").is_file() and (out / "evaluate" / "vqa_accuracy.md").is_file()

    # Only select + evaluate: nothing is recomputed, the finished predictions are reused.
    stamp = os.path.getmtime(out / "evaluate" / "predictions_pointer_1shot.jsonl")
    rerun = subprocess.run(_args(tmp_path, "--resume", "--set", "run.stages=[select,evaluate]"), cwd=REPO, env=_env(),
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "select: reusing" in rerun.stdout and os.path.getmtime(out / "evaluate" / "predictions_pointer_1shot.jsonl") == stamp
