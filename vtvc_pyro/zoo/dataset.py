"""A task split held in memory as ``uint8`` images, normalised with the model's mean and std on access."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


class ImageSplit(Dataset):
    """Items are ``(image [3, H, W] float32, normalised; label int)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float]):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {list(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.normalize(self.images[index]), int(self.labels[index])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` pixels → float32, scaled to [0, 1], minus mean, divided by std."""
        return (images.float() / 255.0 - self.mean) / self.std

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split at once: normalised images ``[N, 3, H, W]`` and labels ``[N]``."""
        return self.normalize(self.images), self.labels

    def subset(self, indices: Sequence[int]) -> ImageSplit:
        """The items at ``indices``, as a new split (shares mean and std)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return ImageSplit(self.images[index], self.labels[index], self.mean.flatten().tolist(),
                          self.std.flatten().tolist())
