"""Training samples of the pointer selectors: one beam-search query with its candidate pool.

Pure torch (no LAVIS). A sample is::

    query_emb   (d,)     features of the query (``train_query`` table)
    cand_emb    (K, d)   features of its K pool candidates (``train_candidate`` table), pool order
    labels      (S,)     beam-search ``icds``: pool indices in selection order
    beam_scores (S,)     beam-search ``scores``: the gain of each icd
    question_id int

Candidate features are gathered per sample from one shared table (nothing is copied K times).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch.utils.data import Dataset

from lever_plugins.icl.data import BeamEntry, IclDataError


class PointerBeamDataset(Dataset):
    """Beam-search queries as pointer-selector training samples (see the module docstring).

    Args:
        entries: checked beam entries (:func:`lever_plugins.icl.data.load_beam_files`).
        query_table / cand_table: ``{"question_ids": (N,), "embeddings": (N, d)}`` feature tables.
        source: the beam file, named in errors.
    """

    def __init__(self, entries: Sequence[BeamEntry], query_table: Mapping, cand_table: Mapping, source: str = "beams.json"):
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
        self.labels = torch.tensor([list(e.icds) for e in self.entries], dtype=torch.long)
        self.beam_scores = torch.tensor([list(e.scores) for e in self.entries], dtype=torch.float32)

    @property
    def pool_size(self) -> int:
        return int(self.pool_index.shape[1])

    @property
    def dim(self) -> int:
        return int(self.query_emb.shape[1])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        return {
            "query_emb": self.query_emb[self.query_index[index]],
            "cand_emb": self.cand_emb[self.pool_index[index]],
            "labels": self.labels[index],
            "beam_scores": self.beam_scores[index],
            "question_id": self.entries[index].question_id,
        }

    def collater(self, samples: Sequence[dict]) -> dict:
        """Stack a list of samples into ``(B, ...)`` tensors (``question_id`` as a ``(B,)`` long tensor)."""
        return {
            "query_emb": torch.stack([s["query_emb"] for s in samples]),
            "cand_emb": torch.stack([s["cand_emb"] for s in samples]),
            "labels": torch.stack([s["labels"] for s in samples]),
            "beam_scores": torch.stack([s["beam_scores"] for s in samples]),
            "question_id": torch.tensor([s["question_id"] for s in samples], dtype=torch.long),
        }
