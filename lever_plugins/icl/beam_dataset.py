"""Training samples of the pointer selectors: one beam of a beam-search query with its candidate pool.

Pure torch (no LAVIS). A sample is::

    query_emb   (d,)     features of the query (``train_query`` table)
    cand_emb    (K, d)   features of its K pool candidates (``train_candidate`` table), pool order
    labels      (S,)     the beam's ``icds``: pool indices in selection order
    beam_scores (S,)     the beam's ``scores`` (the gain of each icd), after the score transform
    beam_rank   int      which kept beam of the query (0: the best)
    question_id int

With ``sequences="all"`` every kept beam of a query is a sample with its own labels and scores
(Lever-LM's training set); with ``"best"`` only the best beam. Candidate features are gathered per
sample from one shared table (nothing is copied K times).
"""
from __future__ import annotations

from typing import Callable, Literal, Mapping, Optional, Sequence

import torch
from torch.utils.data import Dataset

from lever_plugins.icl.data import BeamEntry, IclDataError


class PointerBeamDataset(Dataset):
    """Beam-search queries as pointer-selector training samples (see the module docstring).

    Args:
        entries: checked beam entries (:func:`lever_plugins.icl.data.load_beam_files`).
        query_table / cand_table: ``{"question_ids": (N,), "embeddings": (N, d)}`` feature tables.
        source: the beam file, named in errors.
        sequences: ``"best"`` (one sample per query) or ``"all"`` (one per kept beam).
        score_transform: maps the ``(N, S)`` raw beam scores to ``beam_scores`` (e.g. a fitted
            :class:`~lever_plugins.modules.ranking.BeamScoreTransform`); ``None`` keeps them raw.
            The raw ones stay in ``raw_beam_scores``.
    """

    def __init__(
        self,
        entries: Sequence[BeamEntry],
        query_table: Mapping,
        cand_table: Mapping,
        source: str = "beams.json",
        sequences: Literal["best", "all"] = "best",
        score_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        if sequences not in ("best", "all"):
            raise ValueError(f"sequences must be 'best' or 'all', got {sequences!r}")
        self.entries = list(entries)
        self.source = source
        self.query_emb = query_table["embeddings"]
        self.cand_emb = cand_table["embeddings"]
        if self.query_emb.shape[1] != self.cand_emb.shape[1]:
            raise IclDataError(f"query features are {self.query_emb.shape[1]}-d but candidate features {self.cand_emb.shape[1]}-d")
        query_rows = {int(q): i for i, q in enumerate(query_table["question_ids"].tolist())}
        cand_rows = {int(q): i for i, q in enumerate(cand_table["question_ids"].tolist())}
        self.query_index = torch.empty(len(self.entries), dtype=torch.long)
        self.pool_index = torch.empty(len(self.entries), len(self.entries[0].pool) if self.entries else 0, dtype=torch.long)
        for i, entry in enumerate(self.entries):
            if entry.question_id not in query_rows:
                raise IclDataError(f"{source}: question_id {entry.question_id} has no query features (re-run the embed stage)")
            missing = [c for c in entry.pool if c not in cand_rows]
            if missing:
                raise IclDataError(f"{source}: question_id {entry.question_id} has pool candidates without features: {missing[:5]}")
            if len(entry.pool) != self.pool_index.shape[1]:
                raise IclDataError(
                    f"{source}: question_id {entry.question_id} has a pool of {len(entry.pool)}, others {self.pool_index.shape[1]}"
                )
            self.query_index[i] = query_rows[entry.question_id]
            self.pool_index[i] = torch.tensor([cand_rows[c] for c in entry.pool])
        # One sample per (query, kept beam): sample j is beam sample_beam[j] of entry sample_entry[j].
        samples = [(i, rank, seq) for i, entry in enumerate(self.entries)
                   for rank, seq in enumerate(entry.sequences if sequences == "all" else entry.sequences[:1])]
        lengths = {len(icds) for _, _, (icds, _) in samples}
        if len(lengths) > 1:
            raise IclDataError(f"{source}: beams of different lengths {sorted(lengths)}; the selector needs one")
        self.sequences = sequences
        self.sample_entry = torch.tensor([i for i, _, _ in samples], dtype=torch.long)
        self.sample_beam = torch.tensor([rank for _, rank, _ in samples], dtype=torch.long)
        self.labels = torch.tensor([list(icds) for _, _, (icds, _) in samples], dtype=torch.long)
        self.raw_beam_scores = torch.tensor([list(scores) for _, _, (_, scores) in samples], dtype=torch.float32)
        self.beam_scores = (self.raw_beam_scores if score_transform is None
                            else score_transform(self.raw_beam_scores).to(torch.float32))
        if self.beam_scores.shape != self.raw_beam_scores.shape:
            raise ValueError(f"score_transform changed the shape {tuple(self.raw_beam_scores.shape)} to {tuple(self.beam_scores.shape)}")

    @property
    def pool_size(self) -> int:
        return int(self.pool_index.shape[1])

    @property
    def dim(self) -> int:
        return int(self.query_emb.shape[1])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict:
        entry = int(self.sample_entry[index])
        return {
            "query_emb": self.query_emb[self.query_index[entry]],
            "cand_emb": self.cand_emb[self.pool_index[entry]],
            "labels": self.labels[index],
            "beam_scores": self.beam_scores[index],
            "beam_rank": int(self.sample_beam[index]),
            "question_id": self.entries[entry].question_id,
        }

    def collater(self, samples: Sequence[dict]) -> dict:
        """Stack a list of samples into ``(B, ...)`` tensors (``beam_rank``, ``question_id`` as ``(B,)`` long tensors)."""
        return {
            "query_emb": torch.stack([s["query_emb"] for s in samples]),
            "cand_emb": torch.stack([s["cand_emb"] for s in samples]),
            "labels": torch.stack([s["labels"] for s in samples]),
            "beam_scores": torch.stack([s["beam_scores"] for s in samples]),
            "beam_rank": torch.tensor([s["beam_rank"] for s in samples], dtype=torch.long),
            "question_id": torch.tensor([s["question_id"] for s in samples], dtype=torch.long),
        }
