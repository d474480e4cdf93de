"""Multi-task datasets: the union of several tasks' splits, each item tagged with its task id."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset, Subset, random_split


class MultiTaskDataset(Dataset):
    """Concatenates per-task datasets of ``(image, label)``; item ``i`` is
    ``(i, image, label, task_id)`` where ``task_id`` indexes ``task_names``."""

    def __init__(self, splits: Mapping[str, Dataset], task_names: Sequence[str]):
        unknown = [name for name in splits if name not in task_names]
        if unknown:
            raise ValueError(f"splits for tasks {unknown} that are not in task_names {list(task_names)}")
        self.task_names = list(task_names)
        self.parts = [(self.task_names.index(name), ds) for name, ds in splits.items()]
        sizes = torch.tensor([len(ds) for _, ds in self.parts])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        part = int(torch.searchsorted(self.offsets, torch.tensor(index), right=True)) - 1
        task_id, ds = self.parts[part]
        image, label = ds[index - int(self.offsets[part])]
        return index, image, int(label), task_id

    @property
    def task_ids(self) -> torch.Tensor:
        """``[len(self)]`` task id of every item, without loading images."""
        return torch.cat(
            [torch.full((len(ds),), task_id, dtype=torch.long) for task_id, ds in self.parts]
        )


def train_val_split(
    dataset: Dataset, fraction: float = 0.1, max_val: int = 5000, seed: int = 0
) -> tuple[Subset, Subset]:
    """The task-vector literature's validation protocol: a seeded random ``fraction`` of train (at most
    ``max_val`` items) becomes val, the rest stays train (``random_split`` with ``manual_seed(seed)``)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val fraction must lie in [0, 1), got {fraction}")
    n = len(dataset)
    n_val = min(int(n * fraction), max_val)
    train, val = random_split(dataset, [n - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    return train, val
