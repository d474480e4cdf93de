"""Multi-task datasets and every pass over their images: a ``DataLoader`` (worker processes, pinned memory on
CUDA) fed by a seeded per-step batch sampler, so the data order is a function of (seed, step) and a resumed
run sees the same batches; each distributed rank loads only its rows of every batch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, random_split


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


@dataclass(frozen=True)
class LoaderConfig:
    """How passes over images load them: ``num_workers`` worker processes (0: in the calling process),
    ``pin_memory`` (``None``: when the target device is CUDA), ``prefetch_factor`` batches per worker."""

    num_workers: int = 0
    pin_memory: bool | None = None
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        if not (isinstance(self.num_workers, int) and self.num_workers >= 0):
            raise ValueError(f"loader.num_workers: must be a non-negative integer, got {self.num_workers!r}")
        if not (isinstance(self.prefetch_factor, int) and self.prefetch_factor > 0):
            raise ValueError(f"loader.prefetch_factor: must be a positive integer, "
                             f"got {self.prefetch_factor!r}")
        if self.pin_memory not in (None, True, False):
            raise ValueError(f"loader.pin_memory: must be true, false or null, got {self.pin_memory!r}")

    def options(self, device: torch.device | str) -> dict:
        """``DataLoader`` keyword arguments for a pass whose batches go to ``device``."""
        pin = torch.device(device).type == "cuda" if self.pin_memory is None else self.pin_memory
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers else {}
        return {"num_workers": self.num_workers, "pin_memory": pin, **extra}


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that rank ``rank`` of ``world_size`` takes: contiguous, in rank order,
    sizes differing by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return n * rank // world_size, n * (rank + 1) // world_size


def step_order(step: int, num_data: int, batch_size: int) -> dict[str, int]:
    """Where global mini-batch ``step`` (1-based) lies: its epoch and position in the epoch."""
    if step < 1:
        raise ValueError(f"steps are 1-based, got step {step}")
    per_epoch = math.ceil(num_data / batch_size)
    epoch, position = divmod(step - 1, per_epoch)
    return {"epoch": epoch, "position": position, "batches_per_epoch": per_epoch, "num_data": num_data}


def batch_positions(step: int, num_data: int, batch_size: int, seed: int) -> torch.Tensor:
    """The dataset positions of global mini-batch ``step``: epochs of a seeded permutation (the last batch of
    an epoch may be smaller)."""
    order = step_order(step, num_data, batch_size)
    permutation = torch.randperm(num_data, generator=torch.Generator().manual_seed(seed * 1_000_003
                                                                                    + order["epoch"]))
    start = order["position"] * batch_size
    return permutation[start:start + batch_size]


class StepBatchSampler(Sampler[list[int]]):
    """Yields, for steps ``start + 1 … stop``, this rank's rows of the global mini-batch of each step
    (:func:`batch_positions`, split by :func:`shard_range`)."""

    def __init__(self, num_data: int, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world_size: int = 1):
        if num_data <= 0:
            raise ValueError("the dataset is empty")
        smallest = num_data - (math.ceil(num_data / batch_size) - 1) * batch_size  # an epoch's last batch
        if min(batch_size, smallest) < world_size:
            raise ValueError(f"a mini-batch of {min(batch_size, smallest)} samples (batch_size {batch_size}, "
                             f"{num_data} data) cannot be split over {world_size} ranks")
        self.num_data, self.batch_size, self.seed = num_data, batch_size, seed
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start + 1, self.stop + 1):
            positions = batch_positions(step, self.num_data, self.batch_size, self.seed)
            lo, hi = shard_range(len(positions), self.rank, self.world_size)
            yield positions[lo:hi].tolist()


class _Positioned(Dataset):
    """``data`` whose item ``i`` is ``(i, data[i])``: a batch keeps the dataset positions it came from."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, position: int):
        return position, self.data[position]


def collate(pairs: Sequence[tuple[int, tuple]]) -> tuple[torch.Tensor, ...]:
    """``(positions, images, labels, task ids)`` of ``(position, (index, image, label, task_id))`` pairs, the
    items :class:`MultiTaskDataset` yields."""
    if any(not isinstance(item, (tuple, list)) or len(item) != 4 for _, item in pairs):
        raise ValueError("dataset items must be (index, image, label, task_id) tuples")
    positions = torch.tensor([position for position, _ in pairs], dtype=torch.long)
    images = torch.stack([torch.as_tensor(item[1]) for _, item in pairs])
    labels = torch.tensor([int(item[2]) for _, item in pairs], dtype=torch.long)
    task = torch.tensor([int(item[3]) for _, item in pairs], dtype=torch.long)
    return positions, images, labels, task


def batch_loader(data: Dataset, batches: Sampler[list[int]] | Sequence[Sequence[int]],
                 loader: LoaderConfig | None = None, device: torch.device | str = "cpu") -> DataLoader:
    """A ``DataLoader`` over ``data`` yielding :func:`collate` batches of the given position lists. It has a
    private generator, so iterating it leaves the global torch RNG (Pyro's) untouched."""
    options = (loader or LoaderConfig()).options(device)
    return DataLoader(_Positioned(data), batch_sampler=batches, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0), **options)


def sequential_batches(start: int, stop: int, batch_size: int) -> list[list[int]]:
    """Positions ``start … stop − 1`` in order, ``batch_size`` at a time."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]


def collate_items(data: Dataset, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked ``(images, labels, task ids)`` of the items at ``positions``, loaded in the calling process."""
    return collate([(p, data[p]) for p in positions.tolist()])[1:]
