"""VQAv2 / OK-VQA question + annotation files, beam-search files and their on-disk conventions.

File formats (the official VQAv2 JSON; OK-VQA uses the same):

* questions: ``{"questions": [{"question_id", "image_id", "question"}, ...]}``
* annotations: ``{"annotations": [{"question_id", "image_id", "answers": [{"answer", ...} x 10],
  "multiple_choice_answer", ...}, ...]}``
* beam search (ours; the seeds' format plus the pool): ``beams.json`` =
  ``{question_id: {"icds": [pool indices, in selection order], "scores": [one per icd]}}`` (the best
  beam) and ``pools.json`` = ``{question_id: [candidate question_ids, K of them]}``: ``icds[i]``
  indexes the query's pool, so ``pools[qid][icds[i]]`` is the question_id of the i-th
  demonstration. ``beams_all.json`` (optional; our beam search writes it) holds
  every beam kept at the last step, best first: ``{question_id: [{"icds": [...], "scores": [...]},
  ...]}``; its first beam is the ``beams.json`` entry. ``beams.json`` alone (the seeds' files, older
  runs) still loads: each query then has its best beam only.

Everything is keyed by **question_id**, never by a position in a file. Errors name the file and the
question_id at fault.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from lever_plugins.datasets import files

logger = logging.getLogger(__name__)


class IclDataError(ValueError):
    """A data file is missing, unreadable or holds an entry that cannot be used (message names it)."""


@dataclass(frozen=True)
class VqaExample:
    """One VQA question with its human answers.

    ``answer`` is VQAv2's ``multiple_choice_answer`` (the most common human answer): the gold
    answer the beam search scores and demonstrations show. ``answers`` are all human answers (for
    :func:`lever_plugins.metrics.vqa.vqa_accuracy`).
    """

    question_id: int
    image_id: int
    question: str
    answer: str
    answers: tuple[str, ...]
    image_path: Optional[str] = None


@dataclass
class VqaSplit:
    """The examples of one split, sorted by question_id, with a lookup by question_id."""

    name: str
    examples: list[VqaExample]
    index: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {ex.question_id: i for i, ex in enumerate(self.examples)}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, question_id: int) -> VqaExample:
        return self.examples[self.index[question_id]]

    def __contains__(self, question_id: object) -> bool:
        return question_id in self.index

    @property
    def question_ids(self) -> list[int]:
        return [ex.question_id for ex in self.examples]


def read_json(path: str, what: str) -> Any:
    """Load a JSON file; a missing or malformed file is an :class:`IclDataError` naming it."""
    return files.read_json(path, IclDataError, f"{what} file not found")


def load_example_image(example: "VqaExample", missing_hint: str) -> Any:
    """The RGB image of ``example`` (decoded strictly); errors name the file and question_id."""
    if not example.image_path:
        raise IclDataError(f"question_id {example.question_id}: {missing_hint}")
    return files.load_image(example.image_path, f"question_id {example.question_id}", IclDataError)


def _as_int(value: Any, path: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise IclDataError(f"{path}: {what} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise IclDataError(f"{path}: {what} must be an integer, got {value!r}") from None


def load_vqa_split(
    name: str,
    questions_path: str,
    annotations_path: str,
    images_dir: Optional[str] = None,
    image_template: str = "{image_id:012d}.jpg",
) -> VqaSplit:
    """Join a VQAv2-format questions file with its annotations file by question_id.

    Args:
        name: split name used in messages (``train``, ``eval``).
        questions_path: ``{"questions": [...]}`` file.
        annotations_path: ``{"annotations": [...]}`` file.
        images_dir: folder of the split's images (optional; text-only VLMs need none).
        image_template: file name of an image inside ``images_dir``, formatted with ``image_id``
            (COCO: ``COCO_train2014_{image_id:012d}.jpg``).

    Raises:
        IclDataError: naming the file and question_id of the first unusable entry (missing field,
            duplicate question_id, a question without annotation, no answers).
    """
    questions = read_json(questions_path, "questions")
    annotations = read_json(annotations_path, "annotations")
    if not isinstance(questions, Mapping) or not isinstance(questions.get("questions"), list):
        raise IclDataError(f"{questions_path}: expected {{'questions': [...]}} (the VQAv2 questions format)")
    if not isinstance(annotations, Mapping) or not isinstance(annotations.get("annotations"), list):
        raise IclDataError(f"{annotations_path}: expected {{'annotations': [...]}} (the VQAv2 annotations format)")

    by_id: dict[int, Mapping] = {}
    for position, entry in enumerate(annotations["annotations"]):
        if not isinstance(entry, Mapping) or "question_id" not in entry:
            raise IclDataError(f"{annotations_path}: annotation #{position} has no question_id")
        qid = _as_int(entry["question_id"], annotations_path, f"annotation #{position} question_id")
        if qid in by_id:
            raise IclDataError(f"{annotations_path}: question_id {qid} is annotated twice")
        by_id[qid] = entry

    examples: list[VqaExample] = []
    seen: set[int] = set()
    for position, entry in enumerate(questions["questions"]):
        if not isinstance(entry, Mapping):
            raise IclDataError(f"{questions_path}: question #{position} is not an object")
        for key in ("question_id", "image_id", "question"):
            if key not in entry:
                where = f"question_id {entry['question_id']}" if "question_id" in entry else f"question #{position}"
                raise IclDataError(f"{questions_path}: {where} has no {key!r}")
        qid = _as_int(entry["question_id"], questions_path, f"question #{position} question_id")
        if qid in seen:
            raise IclDataError(f"{questions_path}: question_id {qid} appears twice")
        seen.add(qid)
        annotation = by_id.get(qid)
        if annotation is None:
            raise IclDataError(f"{annotations_path}: no annotation for question_id {qid} (from {questions_path})")
        raw_answers = annotation.get("answers")
        if not isinstance(raw_answers, list) or not raw_answers:
            raise IclDataError(f"{annotations_path}: question_id {qid} has no 'answers' list")
        answers = []
        for item in raw_answers:
            text = item.get("answer") if isinstance(item, Mapping) else item
            if not isinstance(text, str):
                raise IclDataError(f"{annotations_path}: question_id {qid} has an answer that is not a string: {item!r}")
            answers.append(text)
        gold = annotation.get("multiple_choice_answer")
        if not isinstance(gold, str) or not gold.strip():
            gold = max(set(answers), key=lambda a: (answers.count(a), a))  # most common, ties alphabetical
        image_id = _as_int(entry["image_id"], questions_path, f"question_id {qid} image_id")
        image_path = os.path.join(images_dir, image_template.format(image_id=image_id)) if images_dir else None
        examples.append(
            VqaExample(
                question_id=qid, image_id=image_id, question=str(entry["question"]), answer=gold,
                answers=tuple(answers), image_path=image_path,
            )
        )
    if not examples:
        raise IclDataError(f"{questions_path}: no questions")
    examples.sort(key=lambda ex: ex.question_id)
    logger.info("%s split: %d questions from %s", name, len(examples), questions_path)
    return VqaSplit(name, examples)


# ------------------------------------------------------------------------------------------ JSONL


def append_jsonl(path: str, records: Iterable[Mapping]) -> None:
    """Append complete lines and fsync, so that a killed run loses at most the line being written."""
    lines = "".join(json.dumps(record) + "\n" for record in records)
    if not lines:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(lines)
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str, repair: bool = False) -> list[dict]:
    """Records of a JSONL file written by :func:`append_jsonl`.

    A last line without its newline (a write interrupted by a kill) is dropped with a warning and,
    with ``repair``, cut from the file so that later appends start on a clean line. Any other
    malformed line is an :class:`IclDataError` naming the file and line.
    """
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as handle:
        data = handle.read()
    records = []
    complete_bytes = 0
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        if not raw.endswith(b"\n"):
            logger.warning("%s: dropping an incomplete last line (an interrupted write)", path)
            if repair:
                with open(path, "r+b") as handle:
                    handle.truncate(complete_bytes)
            break
        complete_bytes += len(raw)
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise IclDataError(f"{path}:{number}: malformed line ({exc})") from None
    return records


# ------------------------------------------------------------------------------------------ beams


@dataclass(frozen=True)
class BeamEntry:
    """Beam-search result of one query: ``icds`` index ``pool`` (candidate question_ids).

    ``icds`` / ``scores`` are the best beam; ``beams`` every kept beam as ``(icds, scores)`` pairs,
    best first (empty when the beam file has only the best one).
    """

    question_id: int
    pool: tuple[int, ...]
    icds: tuple[int, ...]
    scores: tuple[float, ...]
    beams: tuple[tuple[tuple[int, ...], tuple[float, ...]], ...] = ()

    @property
    def sequences(self) -> tuple[tuple[tuple[int, ...], tuple[float, ...]], ...]:
        """Every stored beam as ``(icds, scores)``, best first (at least the best one)."""
        return self.beams or ((self.icds, self.scores),)


def _checked_sequence(record: Any, where: str, pool_size: int, path: str, qid: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``(icds, scores)`` of one beam record; errors start with ``where``."""
    if not isinstance(record, Mapping) or not isinstance(record.get("icds"), list) or not isinstance(record.get("scores"), list):
        raise IclDataError(f"{where}: expected {{'icds': [...], 'scores': [...]}}, got {record!r}")
    icds = []
    for value in record["icds"]:
        index = _as_int(value, path, f"question_id {qid} icd")
        if not 0 <= index < pool_size:
            raise IclDataError(
                f"{where}: icd index {index} is outside the pool of {pool_size} candidates (valid: 0..{pool_size - 1})"
            )
        icds.append(index)
    if not icds:
        raise IclDataError(f"{where}: empty 'icds'")
    if len(set(icds)) != len(icds):
        raise IclDataError(f"{where}: 'icds' repeats a candidate: {icds}")
    scores = record["scores"]
    if len(scores) != len(icds) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise IclDataError(f"{where}: 'scores' must hold one number per icd ({len(icds)}), got {scores!r}")
    return tuple(icds), tuple(float(s) for s in scores)


def load_beam_files(
    beams_path: str,
    pools_path: str,
    pool_size: Optional[int] = None,
    candidates: Optional[VqaSplit] = None,
    all_beams_path: Optional[str] = None,
) -> list[BeamEntry]:
    """Read and check ``beams.json`` + ``pools.json`` (+ ``beams_all.json``; see the module docstring).

    Args:
        pool_size: expected K (every pool must have exactly K candidates).
        candidates: the split the pools draw from; every pool question_id must be in it.
        all_beams_path: every kept beam per query (``beams_all.json``); ``None``: best beams only.

    Returns:
        Entries sorted by question_id (``beams`` filled from ``all_beams_path`` when given).

    Raises:
        IclDataError: naming the file and question_id of any entry whose ``icds`` fall outside its
            pool, repeat a candidate, disagree in length with ``scores``, or whose pool is missing,
            of the wrong size or names unknown candidates; and when ``all_beams_path`` does not hold
            the same question_ids as ``beams_path`` or its first beam is not the ``beams_path`` entry.
    """
    beams = read_json(beams_path, "beam-search")
    pools = read_json(pools_path, "candidate-pool")
    if not isinstance(beams, Mapping):
        raise IclDataError(f"{beams_path}: expected {{question_id: {{'icds': [...], 'scores': [...]}}}}")
    if not isinstance(pools, Mapping):
        raise IclDataError(f"{pools_path}: expected {{question_id: [candidate question_ids]}}")
    all_beams: Optional[dict[int, Any]] = None
    if all_beams_path is not None:
        raw = read_json(all_beams_path, "all-beams")
        if not isinstance(raw, Mapping):
            raise IclDataError(f"{all_beams_path}: expected {{question_id: [{{'icds': [...], 'scores': [...]}}, ...]}}")
        all_beams = {_as_int(key, all_beams_path, "a key (question_id)"): value for key, value in raw.items()}
        beam_ids = {_as_int(key, beams_path, "a key (question_id)") for key in beams}
        extra, missing = sorted(set(all_beams) - beam_ids), sorted(beam_ids - set(all_beams))
        if extra or missing:
            raise IclDataError(
                f"{all_beams_path}: does not hold the question_ids of {beams_path} (missing {missing[:5]}, extra {extra[:5]}); "
                "the two files come from different beam searches"
            )
    entries = []
    for key, record in beams.items():
        qid = _as_int(key, beams_path, "a key (question_id)")
        where = f"{beams_path}: question_id {qid}"
        if not isinstance(record, Mapping) or not isinstance(record.get("icds"), list) or not isinstance(record.get("scores"), list):
            raise IclDataError(f"{where}: expected {{'icds': [...], 'scores': [...]}}, got {record!r}")
        pool = pools.get(str(qid), pools.get(qid)) if isinstance(pools, Mapping) else None  # type: ignore[call-overload]
        if not isinstance(pool, list) or not pool:
            raise IclDataError(f"{pools_path}: no candidate pool for question_id {qid} (named in {beams_path})")
        pool_ids = tuple(_as_int(p, pools_path, f"question_id {qid} pool entry") for p in pool)
        if pool_size is not None and len(pool_ids) != pool_size:
            raise IclDataError(f"{pools_path}: question_id {qid} has a pool of {len(pool_ids)} candidates, expected K = {pool_size}")
        if len(set(pool_ids)) != len(pool_ids):
            raise IclDataError(f"{pools_path}: question_id {qid} has a pool that repeats a candidate")
        if candidates is not None:
            unknown = [p for p in pool_ids if p not in candidates]
            if unknown:
                raise IclDataError(
                    f"{pools_path}: question_id {qid} has pool candidates not in the {candidates.name} split: {unknown[:5]}"
                )
        icds, scores = _checked_sequence(record, where, len(pool_ids), beams_path, qid)
        kept: tuple = ()
        if all_beams is not None:
            where_all = f"{all_beams_path}: question_id {qid}"
            listed = all_beams[qid]
            if not isinstance(listed, list) or not listed:
                raise IclDataError(f"{where_all}: expected a non-empty list of beams [{{'icds': [...], 'scores': [...]}}, ...]")
            kept = tuple(
                _checked_sequence(beam, f"{where_all} beam {rank}", len(pool_ids), str(all_beams_path), qid)
                for rank, beam in enumerate(listed)
            )
            if kept[0] != (icds, scores):
                raise IclDataError(
                    f"{where_all}: the first (best) beam {list(kept[0][0])} / {list(kept[0][1])} is not the entry of "
                    f"{beams_path} ({list(icds)} / {list(scores)}); the two files come from different beam searches"
                )
            lengths = {len(seq) for seq, _ in kept}
            if len(lengths) > 1:
                raise IclDataError(f"{where_all}: beams of different lengths {sorted(lengths)}")
        entries.append(BeamEntry(qid, pool_ids, icds, scores, kept))
    entries.sort(key=lambda e: e.question_id)
    return entries


def split_by_question_id(question_ids: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/val split by question_id (independent of file order and of the other ids).

    Each id goes to val when a hash of ``(seed, question_id)`` falls below ``val_fraction``; with at
    least two ids and ``0 < val_fraction < 1`` both parts are non-empty (the extreme id is moved).
    """
    import hashlib

    def unit(qid: int) -> float:
        digest = hashlib.sha256(f"{seed}:{qid}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    ranked = sorted(question_ids, key=unit)
    val = {qid for qid in ranked if unit(qid) < val_fraction}
    if 0 < val_fraction < 1 and len(ranked) >= 2:
        if not val:
            val = {ranked[0]}
        elif len(val) == len(ranked):
            val.discard(ranked[-1])
    train_ids = sorted(q for q in question_ids if q not in val)
    return train_ids, sorted(val)
