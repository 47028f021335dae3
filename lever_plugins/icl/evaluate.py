"""Select demonstrations for evaluation queries and measure the VLM's VQA accuracy (or CIDEr) with them.

Selection methods (each returns, per evaluation question_id, supporting-set question_ids in
selection order; ``n`` shots use the first ``n``):

* ``random``: a seeded random sample of the supporting set (per question_id);
* ``similarity`` (RICES): the supporting examples whose query features are most cosine-similar to
  the evaluation query's, most similar first;
* ``pointer``: the trained selector's autoregressive choice from the query's candidate pool (built
  exactly as for beam search: same pool kind, K and seed).

Zero-shot (no demonstration) is always evaluated. The score is the task kind's
(:mod:`~lever_plugins.icl.kinds`): the official VQAv2 accuracy (:func:`lever_plugins.metrics.vqa.
vqa_accuracy`, in percent here), or for captioning corpus CIDEr-D x 100 (:func:`lever_plugins.metrics.
caption.cider`) over the evaluated queries. Predictions are appended per (method, shots) to
``predictions_<method>_<n>shot.jsonl``, so an interrupted evaluation resumes; the summary goes to
``vqa_accuracy.csv`` / ``.md`` / ``.png`` (captioning: ``cider.*``) and ``summary.json``.

With ``shard=True`` under torch.distributed (every rank calls :func:`evaluate_vqa`), each round
deals the next ``world_size`` batches of the single-process batching (question_id order) one per
rank (:func:`~lever_plugins.runners.distributed.shard_indices`), gathers the predictions
(:func:`~lever_plugins.runners.distributed.gather_sharded`) and rank 0 appends them: the same
batches, so the same predictions and accuracies as one process, and a killed run resumes as before.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import random
from typing import Mapping, Optional, Sequence

import torch

from lever_plugins.icl.data import VqaSplit, append_jsonl, read_jsonl
from lever_plugins.icl.kinds import VQA, TaskKind
from lever_plugins.icl.vlm import IclPrompt, VqaVlm
from lever_plugins.io import atomic_output, write_json_atomic, write_text_atomic
from lever_plugins.runners import distributed as lever_dist

logger = logging.getLogger(__name__)

ZERO_SHOT = "zero_shot"
METHOD_LABELS = {ZERO_SHOT: "zero-shot", "random": "random", "similarity": "similarity (RICES)", "pointer": "pointer selector"}


def sample_queries(question_ids: Sequence[int], count: Optional[int], seed: int) -> list[int]:
    """A seeded sample of ``count`` question_ids (all of them when ``count`` is None or larger), sorted."""
    ids = sorted(question_ids)
    if count is None or count >= len(ids):
        return ids
    return sorted(random.Random(f"queries:{seed}").sample(ids, count))


def select_random(query_ids: Sequence[int], support_ids: Sequence[int], shots: int, seed: int) -> dict[int, list[int]]:
    population = sorted(support_ids)
    out = {}
    for qid in query_ids:
        picks = random.Random(f"random:{seed}:{qid}").sample(population, min(len(population), shots + 1))
        out[int(qid)] = [p for p in picks if p != qid][:shots]
    return out


def select_similarity(
    query_ids: Sequence[int], query_emb: torch.Tensor, support_ids: Sequence[int], support_emb: torch.Tensor, shots: int,
    chunk: int = 1024,
) -> dict[int, list[int]]:
    """RICES: the ``shots`` most cosine-similar supporting examples (never the query itself)."""
    from lever_plugins.icl.beam_search import similarity_pools

    return similarity_pools(query_ids, query_emb, support_ids, support_emb, shots, chunk=chunk)


@torch.no_grad()
def select_pointer(
    selector: torch.nn.Module,
    query_ids: Sequence[int],
    query_emb: torch.Tensor,
    pools: Mapping[int, Sequence[int]],
    cand_table: Mapping[int, int],
    cand_emb: torch.Tensor,
    batch_size: int = 256,
) -> dict[int, list[int]]:
    """The selector's picks: ``selector.predict`` on each query's pool, batched.

    Args:
        selector: a pointer selector (``predict(query_emb (B, d), cand_emb (B, K, d)) -> (B, S)``).
        query_emb: ``(Q, d)`` aligned with ``query_ids``.
        pools: candidate question_ids per query.
        cand_table: candidate question_id -> row of ``cand_emb``.
        cand_emb: ``(N, d)``.
    """
    device = next(selector.parameters()).device
    out = {}
    for start in range(0, len(query_ids), batch_size):
        ids = list(query_ids[start:start + batch_size])
        rows = torch.tensor([[cand_table[c] for c in pools[q]] for q in ids], dtype=torch.long)
        predictions, _ = selector.predict(query_emb[start:start + len(ids)].to(device), cand_emb[rows].to(device))
        for qid, picks in zip(ids, predictions.tolist()):
            out[int(qid)] = [int(pools[qid][p]) for p in picks]
    return out


def predictions_path(out_dir: str, method: str, shots: int) -> str:
    return os.path.join(out_dir, f"predictions_{method}_{shots}shot.jsonl")


def evaluate_vqa(
    vlm: VqaVlm,
    eval_split: VqaSplit,
    support: VqaSplit,
    query_ids: Sequence[int],
    selections: Mapping[str, Mapping[int, Sequence[int]]],
    shots: Sequence[int],
    out_dir: str,
    progress: bool = True,
    shard: bool = False,
    kind: TaskKind = VQA,
) -> list[dict]:
    """Generate answers (captions) for every (method, shots) and score them; returns one row per setting.

    Rows: ``{"method", "shots", <kind.metric_key>, "num_queries"}`` (VQA: ``"accuracy"`` in percent;
    captioning: ``"cider"``, CIDEr-D x 100), zero-shot first.
    ``shard``: split the queries over the ranks of torch.distributed (every rank must call it; see
    the module docstring); every rank returns the rows.
    """
    sharded = shard and lever_dist.world_size() > 1
    world = lever_dist.world_size() if sharded else 1
    main = lever_dist.is_main_process() or not sharded
    os.makedirs(out_dir, exist_ok=True)
    settings = [(ZERO_SHOT, 0)] + [(m, n) for m in selections for n in shots]
    rows = []
    size = vlm.settings.batch_size
    for method, n in settings:
        path = predictions_path(out_dir, method, n)
        done = {int(r["question_id"]): r for r in read_jsonl(path, repair=True)} if main else None
        if sharded:
            done = lever_dist.broadcast_object(done)  # rank 0 alone reads (and repairs) the file
        todo = [q for q in query_ids if q not in done]
        if todo and main:
            logger.info("evaluate: %s %d-shot, %d queries%s", method, n, len(todo), f" over {world} ranks" if sharded else "")
        bar = None
        if progress and todo and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"{kind.label} {method} {n}-shot", leave=False, dynamic_ncols=True)
        batches = [todo[start:start + size] for start in range(0, len(todo), size)]
        for first in range(0, len(batches), world):
            round_batches = batches[first:first + world]
            mine = lever_dist.shard_indices(len(round_batches)) if sharded else range(len(round_batches))
            local = [_answer_batch(vlm, eval_split, support, selections, method, n, round_batches[i], kind) for i in mine]
            records = [r for part in (lever_dist.gather_sharded(local) if sharded else local) for r in part]
            if main:
                append_jsonl(path, records)
            done.update({r["question_id"]: r for r in records})
            if bar is not None:
                bar.update(len(records))
        if bar is not None:
            bar.close()
        # Re-scored from the stored answers: predictions cached by an earlier run keep the metric current.
        score = kind.corpus_score([done[q]["prediction"] for q in query_ids], [eval_split[q] for q in query_ids])
        rows.append({"method": method, "shots": n, kind.metric_key: score, "num_queries": len(query_ids)})
    return rows


def _answer_batch(
    vlm: VqaVlm, eval_split: VqaSplit, support: VqaSplit, selections: Mapping[str, Mapping[int, Sequence[int]]],
    method: str, n: int, ids: Sequence[int], kind: TaskKind = VQA,
) -> list[dict]:
    """Prediction records of one batch of evaluation questions (``n`` demonstrations of ``method``)."""
    prompts = []
    for qid in ids:
        demo_ids = [] if n == 0 else list(selections[method][qid])[:n]
        if len(demo_ids) < n:
            raise ValueError(f"{method}: question_id {qid} has {len(demo_ids)} selected demonstrations, {n} needed")
        prompts.append(IclPrompt(eval_split[qid], tuple(support[d] for d in demo_ids)))
    answers = vlm.generate(prompts)
    records = []
    for qid, prompt, answer in zip(ids, prompts, answers):
        query = eval_split[qid]
        records.append({
            "question_id": qid, "prediction": answer, **kind.item_scores(answer, query),
            "demos": [d.question_id for d in prompt.demos],
        })
    return records


def accuracy_table(rows: Sequence[Mapping], kind: TaskKind = VQA) -> tuple[str, str]:
    """``(markdown, csv)`` tables: one row per method, one column per shot count (zero-shot on its own row)."""
    shots = sorted({r["shots"] for r in rows if r["method"] != ZERO_SHOT})
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)]
    by_key = {(r["method"], r["shots"]): r[kind.metric_key] for r in rows}
    header = ["method", *[f"{n}-shot" for n in shots]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method in methods:
        if method == ZERO_SHOT:
            cells = [f"{by_key[(ZERO_SHOT, 0)]:.2f}"] * len(shots)
        else:
            cells = [f"{by_key[(method, n)]:.2f}" if (method, n) in by_key else "" for n in shots]
        lines.append("| " + " | ".join([METHOD_LABELS.get(method, method), *cells]) + " |")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "shots", kind.metric_key, "num_queries"])
    for row in rows:
        writer.writerow([row["method"], row["shots"], f"{row[kind.metric_key]:.4f}", row["num_queries"]])
    return "\n".join(lines) + "\n", buffer.getvalue()


def plot_accuracy(rows: Sequence[Mapping], path: str, title: Optional[str] = None, kind: TaskKind = VQA) -> str:
    """PNG of the score against shot count per method; zero-shot as a dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    zero = [r[kind.metric_key] for r in rows if r["method"] == ZERO_SHOT]
    if zero:
        axes.axhline(zero[0], color="grey", linestyle="--", label=f"zero-shot ({zero[0]:.1f})")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != ZERO_SHOT):
        points = sorted((r["shots"], r[kind.metric_key]) for r in rows if r["method"] == method)
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=METHOD_LABELS.get(method, method))
    axes.set_xlabel("shots")
    axes.set_ylabel(kind.axis_label)
    axes.set_xticks(sorted({r["shots"] for r in rows if r["method"] != ZERO_SHOT}))
    axes.set_title(title or f"{kind.metric_title} vs shots")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path


def report_paths(out_dir: str, kind: TaskKind = VQA) -> dict[str, str]:
    """Where :func:`write_report` writes: ``markdown``, ``csv``, ``png`` (``<kind.report_name>.*``), ``summary``."""
    return {
        "markdown": os.path.join(out_dir, f"{kind.report_name}.md"),
        "csv": os.path.join(out_dir, f"{kind.report_name}.csv"),
        "png": os.path.join(out_dir, f"{kind.report_name}.png"),
        "summary": os.path.join(out_dir, "summary.json"),
    }


def write_report(rows: Sequence[Mapping], out_dir: str, kind: TaskKind = VQA) -> dict[str, str]:
    """Write ``vqa_accuracy.md`` / ``.csv`` / ``.png`` (captioning: ``cider.*``) and ``summary.json``; returns their paths."""
    markdown, csv_text = accuracy_table(rows, kind)
    paths = report_paths(out_dir, kind)
    write_text_atomic(paths["markdown"], markdown)
    write_text_atomic(paths["csv"], csv_text)
    plot_accuracy(rows, paths["png"], kind=kind)
    write_json_atomic(paths["summary"], {"rows": list(rows)}, indent=2)
    return paths
