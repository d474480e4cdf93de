"""Scoring one method on test splits: per-task metrics (``vtvc_pyro.evaluate``), per-sample confidence and
correctness (for reliability diagrams), and statistics of the coefficients the method used."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from vtvc_pyro.evaluate import Predict, TaskMetrics, metrics_from_probs
from vtvc_pyro.heads import HeadBank


@dataclass
class Scores:
    """Per-task metrics, and per sample (tasks concatenated in order): confidence, correctness, task id."""

    tasks: dict[str, TaskMetrics]
    confidence: torch.Tensor
    correct: torch.Tensor

    @classmethod
    def concat(cls, parts: Sequence[Scores]) -> Scores:
        tasks: dict[str, TaskMetrics] = {}
        for part in parts:
            tasks.update(part.tasks)
        return cls(tasks, torch.cat([p.confidence for p in parts]), torch.cat([p.correct for p in parts]))


def encoder_predictor(encode: Callable[[torch.Tensor], torch.Tensor], heads: HeadBank) -> Predict:
    """Probabilities of a plain encoder ``encode(images) -> features`` under each sample's own head."""

    def predict(images: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return heads.logits(encode(images), task).double().softmax(-1)

    return predict


def scores_from_probs(probs: torch.Tensor, labels: torch.Tensor, task: torch.Tensor, heads: HeadBank,
                      ece_bins: int = 15) -> Scores:
    """Scores of ``[N, C_max]`` probabilities with labels and task ids (indexing ``heads``)."""
    per_task, confidence, correct = {}, [], []
    for task_id in task.unique(sorted=True).tolist():
        rows = task == task_id
        p = probs[rows, : int(heads.num_classes[task_id])]
        y = labels[rows]
        per_task[heads.task_names[task_id]] = metrics_from_probs(p, y, ece_bins)
        conf, predicted = p.max(-1)
        confidence.append(conf.float())
        correct.append(predicted == y)
    return Scores(per_task, torch.cat(confidence), torch.cat(correct))


@torch.no_grad()
def predict_dataset(predict: Predict, data: Dataset, batch_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities ``[N, C_max]``, labels ``[N]`` and task ids ``[N]`` of a dataset of
    ``(index, image, label, task_id)`` items (e.g. :class:`~vtvc_pyro.data.MultiTaskDataset`), in order."""
    probs, labels, tasks = [], [], []
    for _, images, target, task in DataLoader(data, batch_size=batch_size, shuffle=False):
        probs.append(predict(images, task.long()).double().cpu())
        labels.append(target.long())
        tasks.append(task.long())
    return torch.cat(probs), torch.cat(labels), torch.cat(tasks)


class CoefficientStats:
    """Running sparsity (share of exactly-zero components) and mean active task vectors per block over
    coefficient tensors ``[..., T, B]`` (one row per sample, or one task-level ``[T, B]``)."""

    def __init__(self) -> None:
        self.zeros = 0
        self.total = 0
        self.active = 0.0
        self.rows = 0

    def add(self, coef: torch.Tensor) -> CoefficientStats:
        coef = coef.detach()
        nonzero = coef != 0
        self.zeros += int((~nonzero).sum())
        self.total += coef.numel()
        per_block = nonzero.sum(-2)  # [..., B]: active task vectors in each block
        self.active += float(per_block.sum())
        self.rows += per_block.numel()
        return self

    def merge(self, other: CoefficientStats) -> CoefficientStats:
        self.zeros += other.zeros
        self.total += other.total
        self.active += other.active
        self.rows += other.rows
        return self

    def summary(self) -> dict[str, float | None]:
        if not self.total:
            return {"sparsity": None, "active_per_block": None}
        return {"sparsity": self.zeros / self.total, "active_per_block": self.active / self.rows}
