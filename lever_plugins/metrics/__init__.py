"""Evaluation metrics, one definition each, imported everywhere else from here.

Resolved lazily so that ``import lever_plugins.metrics`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY_NAMES = {
    "cirr_metrics": "lever_plugins.metrics.cir",
    "recall_at_k": "lever_plugins.metrics.cir",
    "retrieval_metrics": "lever_plugins.metrics.retrieval",
    "coco_1k_5fold_metrics": "lever_plugins.metrics.retrieval",
    "topk_accuracy": "lever_plugins.metrics.ranking",
    "mrr": "lever_plugins.metrics.ranking",
    "ndcg_at_k": "lever_plugins.metrics.ranking",
    "vqa_accuracy": "lever_plugins.metrics.vqa",
    "normalize_vqa_answer": "lever_plugins.metrics.vqa",
    "cider": "lever_plugins.metrics.caption",
    "caption_tokens": "lever_plugins.metrics.caption",
}

__all__ = list(_LAZY_NAMES)


def __getattr__(name: str) -> Any:
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lever_plugins.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
