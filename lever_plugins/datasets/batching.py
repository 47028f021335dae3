"""What every plain dataset of ours shares with LAVIS's runner: batching through ``collater`` (pure torch)."""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate


class CollatedDataset(Dataset):
    """A map-style dataset of dict items, batched with :func:`torch.utils.data.default_collate`."""

    def collater(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch items (LAVIS's runner looks this method up on the dataset)."""
        return default_collate(samples)
