"""evaluate_vqa reports the current VQA metric, also for predictions cached by an earlier run."""
from __future__ import annotations

import json

import pytest

from lever_plugins.icl.data import VqaExample, VqaSplit
from lever_plugins.icl.evaluate import evaluate_vqa, predictions_path
from lever_plugins.metrics.vqa import vqa_accuracy


class _NoVlm:
    class settings:  # noqa: N801 - attribute bag like VlmSettings
        batch_size = 4

    def generate(self, prompts):  # pragma: no cover - must not run: everything is cached
        raise AssertionError("cached predictions must not be regenerated")


def test_cached_predictions_are_rescored_with_the_current_metric(tmp_path):
    answers = ("The Dog",) * 3 + ("cat",) * 7
    split = VqaSplit("eval", [VqaExample(7, 1, "what?", "cat", answers)])
    path = predictions_path(str(tmp_path), "zero_shot", 0)
    # An earlier run stored an accuracy computed with another gold-answer processing.
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"question_id": 7, "prediction": "dog", "accuracy": 0.9, "demos": []}) + "\n")
    rows = evaluate_vqa(_NoVlm(), split, split, [7], {}, [1], str(tmp_path), progress=False)
    assert rows[0]["method"] == "zero_shot"
    assert rows[0]["accuracy"] == pytest.approx(100.0 * vqa_accuracy("dog", list(answers)))
    assert rows[0]["accuracy"] == 0.0
