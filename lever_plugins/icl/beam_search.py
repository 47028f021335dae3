"""Beam-search training data for the pointer selectors (Lever-LM style), written incrementally.

For each query ``x`` (with gold answer ``y``; captioning: ``y`` is the query image's caption, the
task kind's target, :mod:`~lever_plugins.icl.kinds`) and its candidate pool ``P`` (K supporting examples):

1. ``s(S) = score(VLM(y | x, S))`` for a demonstration sequence ``S``, from the answer's mean
   per-token NLL: ``exp(-NLL)`` (``prob_gain``, Lever-LM's InfoScore) or ``-NLL`` (``logprob_gain``);
2. step ``t`` extends every kept beam ``S`` by every candidate ``c`` of ``P`` not in ``S``; the
   candidate's **gain** is ``s(S + c) - s(S)``; all extensions of all beams are scored in one batched
   pass (``run.vlm.batch_size`` sequences per forward, no loop over candidates);
3. the ``beam_size`` extensions with the highest gain are kept, ranked by ``rank_by``:
   ``last_gain`` (default, Lever-LM's ``generate_data.py``: each beam's ``topk`` of
   ``get_info_score``, then ``beam_filter`` over all of them) ranks by the last step's gain
   ``s(S + c) - s(S)`` alone; ``cumulative_gain`` ranks by ``s(S + c) - s([])``, how much the whole
   sequence raises the gold answer's score over zero-shot. The two differ when beams start from
   different scores. Ties go to the earlier beam, then the lower pool index (deterministic).

The new demonstration goes to the far left of the prompt (Lever-LM's ``construct_order: left``):
the prompt shows the selection in reverse, the first choice next to the query (:mod:`~lever_plugins.
icl.vlm`). ``tests/test_icl_leverlm_parity.py`` checks the scores and the kept beams against numbers
recorded from Lever-LM's own ``get_info_score`` and beam loop.

Every beam kept at the last step is a training sequence (Lever-LM trains on all of them): ``icds``
(pool indices in selection order) and ``scores`` (each step's gain: ``scores[i]`` is the gain of
``icds[i]``; for ``prob_gain`` they sum to ``s(icds) - s([])``). Each finished query is appended as
one line to ``beams.part<rank>.jsonl`` (the best beam's ``icds`` / ``scores`` plus ``beams``, all kept
beams best first); a re-run skips question_ids already present in any part file, so a killed run
loses at most the query in progress. :func:`merge_beam_parts` writes ``beams.json`` (the best beam
per query, the seeds' format) and ``beams_all.json`` (every kept beam) once every query is done.
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from lever_plugins.icl.data import VqaExample, VqaSplit, append_jsonl, read_jsonl
from lever_plugins.icl.vlm import IclPrompt, VqaVlm, score_from_nll
from lever_plugins.io import write_json_atomic

logger = logging.getLogger(__name__)

BEAMS_FILE = "beams.json"
ALL_BEAMS_FILE = "beams_all.json"
POOLS_FILE = "pools.json"
PART_PREFIX = "beams.part"


# ----------------------------------------------------------------------------------------- pools


def random_pools(query_ids: Sequence[int], candidate_ids: Sequence[int], pool_size: int, seed: int) -> dict[int, list[int]]:
    """K random candidates per query (never the query itself), seeded per question_id.

    The pool of a query depends only on ``(seed, question_id, candidate_ids)``, not on the other
    queries, so adding queries or resuming leaves existing pools unchanged.
    """
    population = sorted(candidate_ids)
    if len(population) - 1 < pool_size:
        raise ValueError(f"pool_size {pool_size} needs more than {len(population)} supporting examples")
    pools = {}
    for qid in query_ids:
        rng = random.Random(f"{seed}:{qid}")
        chosen = [c for c in rng.sample(population, pool_size + 1) if c != qid][:pool_size]
        pools[int(qid)] = chosen
    return pools


def similarity_pools(
    query_ids: Sequence[int], query_emb: torch.Tensor, candidate_ids: Sequence[int], cand_emb: torch.Tensor,
    pool_size: int, chunk: int = 1024,
) -> dict[int, list[int]]:
    """The K candidates most cosine-similar to each query (the query itself excluded), most similar first.

    Args:
        query_emb: ``(Q, d)`` aligned with ``query_ids``.
        cand_emb: ``(N, d)`` aligned with ``candidate_ids``.
    """
    if len(candidate_ids) - 1 < pool_size:
        raise ValueError(f"pool_size {pool_size} needs more than {len(candidate_ids)} supporting examples")
    cand_unit = torch.nn.functional.normalize(cand_emb.float(), dim=-1)
    cand_ids = torch.as_tensor(list(candidate_ids), dtype=torch.long)
    pools = {}
    for start in range(0, len(query_ids), chunk):
        ids = torch.as_tensor(list(query_ids[start:start + chunk]), dtype=torch.long)
        sims = torch.nn.functional.normalize(query_emb[start:start + chunk].float(), dim=-1) @ cand_unit.T
        sims = sims.masked_fill(ids[:, None] == cand_ids[None, :], float("-inf"))
        top = sims.topk(pool_size, dim=-1).indices
        for qid, row in zip(ids.tolist(), top.tolist()):
            pools[qid] = cand_ids[row].tolist()
    return pools


# ----------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class _Beam:
    sequence: tuple[int, ...]  # pool indices in selection order
    gains: tuple[float, ...]
    score: float  # s(sequence)


RANK_BY = ("last_gain", "cumulative_gain")


def beam_search_query(
    vlm: VqaVlm, query: VqaExample, pool: Sequence[VqaExample], beam_size: int, shots: int, score: str,
    rank_by: str = "last_gain",
) -> dict:
    """Beam search for one query (see the module docstring).

    Args:
        rank_by: ``last_gain`` (Lever-LM) or ``cumulative_gain``: what the kept extensions are ranked by.

    Returns:
        ``{"question_id", "icds", "scores", "base_score", "final_score", "beams": [{"icds", "scores"}]}``
        with the best beam first.
    """
    if shots > len(pool):
        raise ValueError(f"question_id {query.question_id}: cannot choose {shots} demonstrations from a pool of {len(pool)}")
    if rank_by not in RANK_BY:
        raise ValueError(f"unknown rank_by {rank_by!r}; expected one of {RANK_BY}")
    base = float(score_from_nll(vlm.answer_nll([IclPrompt(query)], [query.answer]), score)[0])
    beams = [_Beam((), (), base)]
    for _ in range(shots):
        owners: list[tuple[int, int]] = []
        prompts: list[IclPrompt] = []
        for b, beam in enumerate(beams):
            for c in range(len(pool)):
                if c in beam.sequence:
                    continue
                owners.append((b, c))
                prompts.append(IclPrompt(query, tuple(pool[i] for i in (*beam.sequence, c))))
        scores = score_from_nll(vlm.answer_nll(prompts, [query.answer] * len(prompts)), score).tolist()
        # The gain a candidate is ranked by: over its own beam (Lever-LM) or over zero-shot.
        reference = [beams[b].score if rank_by == "last_gain" else base for b, _ in owners]
        ranked = sorted(range(len(owners)), key=lambda j: (-(scores[j] - reference[j]), owners[j][0], owners[j][1]))
        new_beams = []
        for j in ranked[:beam_size]:
            b, c = owners[j]
            parent = beams[b]
            new_beams.append(_Beam((*parent.sequence, c), (*parent.gains, scores[j] - parent.score), scores[j]))
        beams = new_beams
    best = beams[0]
    return {
        "question_id": query.question_id,
        "icds": list(best.sequence),
        "scores": list(best.gains),
        "base_score": base,
        "final_score": best.score,
        "beams": [{"icds": list(b.sequence), "scores": list(b.gains)} for b in beams],
    }


def part_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"{PART_PREFIX}{rank}.jsonl")


def _part_files(out_dir: str) -> list[str]:
    if not os.path.isdir(out_dir):
        return []
    names = sorted(n for n in os.listdir(out_dir) if n.startswith(PART_PREFIX) and n.endswith(".jsonl"))
    return [os.path.join(out_dir, n) for n in names]


def finished_records(out_dir: str, repair: bool = False) -> dict[int, dict]:
    """Records of every query already written to any part file, by question_id."""
    done: dict[int, dict] = {}
    for path in _part_files(out_dir):
        for record in read_jsonl(path, repair=repair):
            done[int(record["question_id"])] = record
    return done


def run_beam_search(
    vlm: VqaVlm,
    candidates: VqaSplit,
    query_ids: Sequence[int],
    pools: Mapping[int, Sequence[int]],
    out_dir: str,
    *,
    beam_size: int,
    shots: int,
    score: str,
    rank_by: str = "last_gain",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    max_queries: Optional[int] = None,
) -> int:
    """Beam-search this rank's share of ``query_ids`` that are not finished yet; returns how many ran.

    Queries are dealt round-robin to ranks (``query_ids[rank::world_size]``); each rank appends to
    its own part file. ``max_queries`` stops early (used by tests to simulate an interrupted run).
    """
    os.makedirs(out_dir, exist_ok=True)
    own_path = part_path(out_dir, rank)
    read_jsonl(own_path, repair=True)  # cut a half-written last line before appending
    done = finished_records(out_dir)
    todo = [q for q in list(query_ids)[rank::world_size] if q not in done]
    if max_queries is not None:
        todo = todo[:max_queries]
    if not todo:
        return 0
    logger.info("beam search: %d queries to do (%d already done) on rank %d", len(todo), len(done), rank)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="beam search", leave=False, dynamic_ncols=True)
    started = time.time()
    for count, qid in enumerate(todo, start=1):
        query = candidates[qid]
        pool = [candidates[c] for c in pools[qid]]
        record = beam_search_query(vlm, query, pool, beam_size, shots, score, rank_by)
        append_jsonl(own_path, [record])
        if bar is not None:
            bar.update(1)
        elif count % 100 == 0:
            logger.info("beam search: %d/%d queries (%.1f s/query)", count, len(todo), (time.time() - started) / count)
    if bar is not None:
        bar.close()
    return len(todo)


def _kept_beams(record: Mapping) -> list[dict]:
    """All kept beams of a part-file record, best first (records without ``beams``: the best only)."""
    kept = record.get("beams") or [{"icds": record["icds"], "scores": record["scores"]}]
    return [{"icds": list(b["icds"]), "scores": list(b["scores"])} for b in kept]


def write_all_beams(out_dir: str, query_ids: Sequence[int], done: Optional[Mapping[int, Mapping]] = None) -> Optional[str]:
    """Write ``beams_all.json`` (every kept beam per query, best first) from the part files.

    Returns its path, or None while queries are missing from the part files.
    """
    done = finished_records(out_dir) if done is None else done
    if any(q not in done for q in query_ids):
        return None
    path = os.path.join(out_dir, ALL_BEAMS_FILE)
    write_json_atomic(path, {str(q): _kept_beams(done[q]) for q in sorted(query_ids)})
    return path


def merge_beam_parts(out_dir: str, query_ids: Sequence[int]) -> Optional[str]:
    """Write ``beams.json`` (the seeds' format: the best beam) and ``beams_all.json`` (every kept beam)
    once every query of ``query_ids`` is finished.

    Returns the path of ``beams.json``, or None while queries are missing.
    """
    done = finished_records(out_dir)
    missing = [q for q in query_ids if q not in done]
    if missing:
        logger.info("beam search: %d of %d queries still missing; beams.json not written yet", len(missing), len(query_ids))
        return None
    # beams_all.json first: a beams.json without it would read as an older, best-beam-only run.
    write_all_beams(out_dir, query_ids, done)
    merged = {str(q): {"icds": done[q]["icds"], "scores": done[q]["scores"]} for q in sorted(query_ids)}
    path = os.path.join(out_dir, BEAMS_FILE)
    write_json_atomic(path, merged)
    return path
