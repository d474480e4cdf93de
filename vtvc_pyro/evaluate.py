"""Evaluation: top-1 accuracy, normalised accuracy, NLL and ECE per task, coefficient selection on val,
and result tables (pandas → Markdown / CSV, written atomically).

The metric functions take logits or probabilities and labels, so any predictor (a merged encoder, a
Monte Carlo predictive average) is scored the same way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vtvc_pyro.heads import HeadBank
from vtvc_pyro.io import atomic_write

ECE_BINS = 15
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``predict(images, task_ids) -> [N, C_max]`` class probabilities of each sample under its task's head."""
ALPHA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))


@dataclass(frozen=True)
class TaskMetrics:
    """One task's scores: accuracy in [0, 1], mean NLL in nats, ECE in [0, 1], number of samples."""

    accuracy: float
    nll: float
    ece: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, float]) -> TaskMetrics:
        return cls(float(data["accuracy"]), float(data["nll"]), float(data["ece"]), int(data["n"]))


def _check_pair(scores: torch.Tensor, labels: torch.Tensor) -> None:
    if scores.ndim != 2 or labels.ndim != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"expected scores [N, C] and labels [N], got {list(scores.shape)} and "
                         f"{list(labels.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("cannot score an empty set of predictions")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must lie in [0, {scores.shape[1]}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``[N, C]`` logits or probabilities against ``[N]`` labels."""
    _check_pair(scores, labels)
    return (scores.argmax(-1) == labels).double().mean().item()


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean ``−log p(label)`` of ``[N, C]`` class probabilities (clamped at ``eps``)."""
    _check_pair(probs, labels)
    picked = probs.double().gather(1, labels[:, None].long()).squeeze(1)
    return (-picked.clamp_min(eps).log()).mean().item()


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = ECE_BINS
                     ) -> dict[str, list[float]]:
    """Equal-width confidence bins ``(k/M, (k+1)/M]``: mean confidence, accuracy and count of every
    non-empty bin (the reliability diagram, and the bins ECE sums over)."""
    confidence = torch.as_tensor(confidence).double().reshape(-1)
    correct = torch.as_tensor(correct).double().reshape(-1)
    which = (confidence * num_bins).ceil().long().clamp(1, num_bins) - 1
    counts = torch.bincount(which, minlength=num_bins)
    keep = counts > 0
    sums = {key: torch.zeros(num_bins, dtype=torch.float64).index_add_(0, which, value)
            for key, value in (("confidence", confidence), ("accuracy", correct))}
    out = {key: (value[keep] / counts[keep]).tolist() for key, value in sums.items()}
    return {**out, "count": counts[keep].tolist()}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = ECE_BINS) -> float:
    """ECE with ``num_bins`` equal-width confidence bins (Guo et al., 2017):
    ``Σ_bins |B|/N · |accuracy(B) − mean confidence(B)|``."""
    _check_pair(probs, labels)
    confidence, predicted = probs.double().max(-1)
    bins = reliability_bins(confidence, predicted == labels, num_bins)
    n = float(len(labels))
    return sum(c / n * abs(a - m) for c, a, m in zip(bins["count"], bins["accuracy"], bins["confidence"],
                                                     strict=True))


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy ``−Σ p log p`` over the last dimension (``0 log 0 = 0``)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def metrics_from_probs(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = ECE_BINS) -> TaskMetrics:
    """All metrics of a predictive distribution (e.g. a Monte Carlo average of probabilities)."""
    return TaskMetrics(accuracy(probs, labels), negative_log_likelihood(probs, labels),
                       expected_calibration_error(probs, labels, num_bins), len(labels))


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = ECE_BINS) -> TaskMetrics:
    """All metrics of ``[N, C]`` logits (NLL through ``log_softmax``, so it is exact for large logits)."""
    _check_pair(logits, labels)
    logits = logits.double()
    nll = F.cross_entropy(logits, labels.long()).item()
    probs = logits.softmax(-1)
    return TaskMetrics(accuracy(logits, labels), nll, expected_calibration_error(probs, labels, num_bins),
                       len(labels))


@torch.no_grad()
def evaluate_encoder(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    heads: HeadBank,
    splits: Mapping[str, Dataset],
    batch_size: int = 256,
) -> dict[str, TaskMetrics]:
    """Score an encoder on each task's split with that task's head.

    ``encode(images [N, 3, H, W], task_ids [N]) -> features [N, D]``; ``task_ids`` index
    ``heads.task_names`` (a merged encoder ignores them, a sample-specific one may use them).
    """
    results = {}
    for task, dataset in splits.items():
        if task not in heads.task_names:
            raise KeyError(f"no head for task {task!r}; heads cover {heads.task_names}")
        task_id = heads.task_names.index(task)
        logits, labels = [], []
        for images, target in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            ids = torch.full((len(images),), task_id, dtype=torch.long)
            logits.append(heads[task](encode(images, ids)).float().cpu())
            labels.append(torch.as_tensor(target).long())
        results[task] = metrics_from_logits(torch.cat(logits), torch.cat(labels))
    return results


def _acc(value: float | TaskMetrics) -> float:
    return value.accuracy if isinstance(value, TaskMetrics) else float(value)


def normalized_accuracy(acc: Mapping[str, float | TaskMetrics],
                        finetuned_acc: Mapping[str, float | TaskMetrics]) -> dict[str, float]:
    """Accuracy ÷ the task's fine-tuned accuracy, per task."""
    out = {}
    for task, value in acc.items():
        if task not in finetuned_acc:
            raise KeyError(f"no fine-tuned accuracy for task {task!r}; have {sorted(finetuned_acc)}")
        reference = _acc(finetuned_acc[task])
        if reference <= 0:
            raise ValueError(f"fine-tuned accuracy of task {task!r} is {reference}; cannot normalise by it")
        out[task] = _acc(value) / reference
    return out


def mean_normalized_accuracy(acc: Mapping[str, float | TaskMetrics],
                             finetuned_acc: Mapping[str, float | TaskMetrics]) -> float:
    """Mean over tasks of the normalised accuracy: the literature's coefficient-selection score."""
    values = normalized_accuracy(acc, finetuned_acc)
    return sum(values.values()) / len(values)


@dataclass(frozen=True)
class AlphaSelection:
    """The chosen coefficient, its val score and val metrics, and the score of every grid point."""

    alpha: float
    score: float
    metrics: dict[str, TaskMetrics]
    scores: dict[float, float]


def select_alpha(
    evaluate_at: Callable[[float], Mapping[str, TaskMetrics]],
    finetuned_acc: Mapping[str, float | TaskMetrics],
    grid: Sequence[float] = ALPHA_GRID,
) -> AlphaSelection:
    """Pick the scaling coefficient with the best mean normalised accuracy on val (the first on ties).

    ``evaluate_at(alpha)`` scores the merged model on the val splits; report test once, at the result.
    """
    if not grid:
        raise ValueError("select_alpha needs a non-empty grid")
    scores, metrics = {}, {}
    for alpha in map(float, grid):
        metrics[alpha] = dict(evaluate_at(alpha))
        scores[alpha] = mean_normalized_accuracy(metrics[alpha], finetuned_acc)
    best = max(scores, key=scores.__getitem__)  # the first maximum in grid order
    return AlphaSelection(best, scores[best], metrics[best], scores)


def results_table(rows: Mapping[str, Mapping[str, TaskMetrics]],
                  finetuned_acc: Mapping[str, float | TaskMetrics]) -> pd.DataFrame:
    """One row per method: per-task accuracy and normalised accuracy (in %), then the means of
    accuracy, normalised accuracy, NLL and ECE. Both accuracies always appear."""
    records = {}
    for method, per_task in rows.items():
        if not per_task:
            raise ValueError(f"method {method!r} has no task results")
        norm = normalized_accuracy(per_task, finetuned_acc)
        record: dict[str, float] = {}
        for task, m in per_task.items():
            record[f"{task} acc"] = 100.0 * m.accuracy
            record[f"{task} norm"] = 100.0 * norm[task]
        count = len(per_task)
        record["mean acc"] = 100.0 * sum(m.accuracy for m in per_task.values()) / count
        record["mean norm"] = 100.0 * sum(norm.values()) / count
        record["mean nll"] = sum(m.nll for m in per_task.values()) / count
        record["mean ece"] = sum(m.ece for m in per_task.values()) / count
        records[method] = record
    table = pd.DataFrame.from_dict(records, orient="index")
    table.index.name = "method"
    return table


def table_to_markdown(table: pd.DataFrame, digits: int = 1) -> str:
    """A GitHub-flavoured Markdown table (no ``tabulate`` needed); NLL and ECE get 3 decimals."""
    columns = [table.index.name or ""] + [str(c) for c in table.columns]

    def cell(column: str, value: object) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return ""
            return f"{value:.3f}" if column.endswith(("nll", "ece")) else f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * len(table.columns)) + "|"]
    for index, row in table.iterrows():
        lines.append("| " + " | ".join([str(index)] + [cell(str(c), row[c]) for c in table.columns]) + " |")
    return "\n".join(lines)


def save_table(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``table`` atomically as Markdown (``.md``) or CSV (``.csv``), chosen by the suffix."""
    suffix = os.fspath(path).rsplit(".", 1)[-1].lower()
    if suffix == "md":
        text = table_to_markdown(table) + "\n"
    elif suffix == "csv":
        text = table.to_csv()
    else:
        raise ValueError(f"cannot tell the table format of {os.fspath(path)!r}: use a .md or .csv suffix")
    with atomic_write(path) as handle:
        handle.write(text)
