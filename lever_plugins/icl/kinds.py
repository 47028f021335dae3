"""Task kinds of the ICD-selection pipeline: what a demonstration shows, what is scored, how it is evaluated.

The stages are the same for every kind (embed, beam search, train, select, evaluate); a kind fixes
only these differences, here and nowhere else:

==============  ===========================================  ==========================================
                ``vqa`` (``lever_vqa_icl``)                  ``caption`` (``lever_coco_caption_icl``)
==============  ===========================================  ==========================================
example         question + gold answer (+ image)             image + one caption (its first sentence)
demonstration   ``icd_template`` with ``{question}``,        ``icd_template`` with ``{caption}``
                ``{answer}``; chat: user question, answer    chat: user image + ``query_template``,
                                                             assistant caption
query           ``query_template`` with ``{question}``       ``query_template`` without placeholders
scored target   the gold answer (``multiple_choice_answer``)  the query's caption
evaluation      VQAv2 accuracy (%) per question, mean        corpus CIDEr-D x 100 over the queries
==============  ===========================================  ==========================================

Both kinds share one example record, :class:`lever_plugins.icl.data.VqaExample`: ``answer`` is what a
demonstration shows after its prompt and what beam search scores (the VQA gold answer, or the
caption), ``answers`` what evaluation compares with (the human answers, or every reference caption).
A caption example has an empty ``question`` and is keyed by its COCO id (``question_id`` = ``cocoid``).

The template placeholders of each kind are declared with the settings (``TEMPLATE_FIELDS`` in
:mod:`lever_plugins.schemas.icl`, which checks recipes against them). Pure Python; the metrics are
imported when first used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from lever_plugins.schemas.icl import TEMPLATE_FIELDS


@dataclass(frozen=True)
class TaskKind:
    """One kind (see the module docstring). ``demo_fields`` / ``query_fields``: template placeholder ->
    the example attribute it shows."""

    name: str
    label: str  # in progress bars
    demo_fields: Mapping[str, str]
    query_fields: Mapping[str, str]
    metric_key: str  # the column of the evaluation table
    metric_title: str  # in logs, plot titles and progress bars
    axis_label: str
    report_name: str  # evaluate/<report_name>.{md,csv,png}

    def demo_values(self, example: Any) -> dict[str, str]:
        """Placeholder values of ``icd_template`` for a demonstration."""
        return {key: getattr(example, attribute) for key, attribute in self.demo_fields.items()}

    def query_values(self, example: Any) -> dict[str, str]:
        """Placeholder values of ``query_template`` for a query (or a chat demonstration's user turn)."""
        return {key: getattr(example, attribute) for key, attribute in self.query_fields.items()}

    def item_scores(self, prediction: str, example: Any) -> dict[str, float]:
        """Per-prediction scores stored with each prediction record (none for corpus metrics)."""
        return {}

    def corpus_score(self, predictions: Sequence[str], examples: Sequence[Any]) -> float:
        """The evaluation score of ``predictions[i]`` for ``examples[i]``, all queries together."""
        raise NotImplementedError


class VqaKind(TaskKind):
    def item_scores(self, prediction: str, example: Any) -> dict[str, float]:
        from lever_plugins.metrics.vqa import vqa_accuracy

        return {"accuracy": vqa_accuracy(prediction, list(example.answers))}

    def corpus_score(self, predictions: Sequence[str], examples: Sequence[Any]) -> float:
        from lever_plugins.metrics.vqa import vqa_accuracy

        scores = [vqa_accuracy(p, list(e.answers)) for p, e in zip(predictions, examples)]
        return 100.0 * sum(scores) / len(scores)


class CaptionKind(TaskKind):
    def corpus_score(self, predictions: Sequence[str], examples: Sequence[Any]) -> float:
        from lever_plugins.metrics.caption import cider

        score, _ = cider(dict(enumerate(predictions)), {i: list(e.answers) for i, e in enumerate(examples)})
        return 100.0 * score


VQA = VqaKind(
    name="vqa", label="VQA", demo_fields=TEMPLATE_FIELDS["vqa"]["demo"], query_fields=TEMPLATE_FIELDS["vqa"]["query"],
    metric_key="accuracy", metric_title="VQA accuracy", axis_label="VQA accuracy (%)", report_name="vqa_accuracy",
)
CAPTION = CaptionKind(
    name="caption", label="captioning", demo_fields=TEMPLATE_FIELDS["caption"]["demo"], query_fields=TEMPLATE_FIELDS["caption"]["query"],
    metric_key="cider", metric_title="CIDEr", axis_label="CIDEr (x 100)", report_name="cider",
)
TASK_KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (VQA, CAPTION)}
