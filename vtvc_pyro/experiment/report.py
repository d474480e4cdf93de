"""The comparison table of a run (``table.md``, ``table.csv``), from the per-method result dicts.

A method result is plain data: ``{"tasks": {task: {"accuracy", "nll", "ece", "n"}}, "sparsity",
"active_per_block", "fit_seconds", "eval_seconds", ...}``. Normalised accuracy is accuracy divided by the
fine-tuned model's accuracy on the same task's test split (the ``finetuned`` method's result).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from vtvc_pyro.io import atomic_write


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


SPREAD = ("mean_accuracy", "mean_normalized_accuracy", "nll", "ece", "sparsity")
"""The summary numbers reported with a standard deviation over seeds."""


def _sd(values: Sequence[float | None]) -> float | None:
    """Sample standard deviation (``n − 1``), or None with fewer than two values."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(
    results: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], finetuned_accuracy: Mapping[str, float]
) -> dict[str, dict[str, Any]]:
    """Per method: per-task metrics with normalised accuracy, and their means over ``tasks``; for a method
    fitted with several seeds (``result["seeds"]``) the means over seeds, the number of seeds and each summary
    number's standard deviation over seeds (``sd``)."""
    rows = {}
    for method, result in results.items():
        rows[method] = _summary(result, tasks, finetuned_accuracy)
        seeds = result.get("seeds") or {}
        if len(seeds) > 1:
            each = [_summary(r, tasks, finetuned_accuracy) for r in seeds.values()]
            rows[method]["seeds"] = len(seeds)
            rows[method]["sd"] = {key: _sd([row[key] for row in each]) for key in SPREAD}
    return rows


def _summary(result: Mapping[str, Any], tasks: Sequence[str], finetuned_accuracy: Mapping[str, float]
             ) -> dict[str, Any]:
    """One result's per-task metrics with normalised accuracy, and their means over ``tasks``."""
    per_task = {}
    for task in tasks:
        metrics = dict(result["tasks"][task])
        reference = finetuned_accuracy.get(task)
        metrics["normalized_accuracy"] = metrics["accuracy"] / reference if reference else None
        per_task[task] = metrics
    return {
        "tasks": per_task,
        "mean_accuracy": _mean([m["accuracy"] for m in per_task.values()]),
        "mean_normalized_accuracy": _mean([m["normalized_accuracy"] for m in per_task.values()]),
        "nll": _mean([m["nll"] for m in per_task.values()]),
        "ece": _mean([m["ece"] for m in per_task.values()]),
        "sparsity": result.get("sparsity"),
        "active_per_block": result.get("active_per_block"),
        "fit_seconds": result.get("fit_seconds"),
        "eval_seconds": result.get("eval_seconds"),
    }


def _fmt(value: float | None, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "sec":
        return f"{value:.1f}"
    return f"{value:.3f}" if kind == "3" else f"{value:.2f}"


def table_rows(rows: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]
               ) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the comparison table (accuracies in %; ``mean ± sd`` over seeds for a
    method fitted with several)."""
    header = ["method", *tasks, "mean acc", "mean norm. acc", "NLL", "ECE", "sparsity",
              "active TVs/block", "fit s", "eval s"]
    body = []
    for method, row in rows.items():
        sd = row.get("sd") or {}

        def spread(key: str, kind: str) -> str:
            text = _fmt(row[key], kind)  # noqa: B023 (called in this iteration)
            return text if sd.get(key) is None else f"{text} ± {_fmt(sd[key], kind)}"  # noqa: B023

        body.append([
            method if "seeds" not in row else f"{method} ({row['seeds']} seeds)",
            *(_fmt(row["tasks"][t]["accuracy"], "pct") for t in tasks),
            spread("mean_accuracy", "pct"),
            spread("mean_normalized_accuracy", "pct"),
            spread("nll", "3"),
            spread("ece", "3"),
            spread("sparsity", "3"),
            _fmt(row["active_per_block"], "2"),
            _fmt(row["fit_seconds"], "sec"),
            _fmt(row["eval_seconds"], "sec"),
        ])
    return header, body


def to_markdown(rows: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], title: str = "") -> str:
    header, body = table_rows(rows, tasks)
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|")
    lines.extend("| " + " | ".join(cells) + " |" for cells in body)
    lines += [
        "",
        "Per-task and mean accuracies are test accuracies in %; normalised accuracy divides by the "
        "fine-tuned model's accuracy on the same task. NLL and ECE are means over tasks. Sparsity is the "
        "share of gated-off (zero) components; active TVs/block is the mean number of task vectors with a "
        "non-zero coefficient in a block. A method fitted with several seeds shows means over seeds, ± the "
        "standard deviation over seeds; its seconds are summed over seeds.",
    ]
    return "\n".join(lines) + "\n"


def to_csv(rows: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """One row per method, unformatted numbers (``sd.*``: standard deviations over seeds)."""
    fields = [
        "method",
        *(f"accuracy.{t}" for t in tasks),
        *(f"normalized_accuracy.{t}" for t in tasks),
        "mean_accuracy", "mean_normalized_accuracy", "nll", "ece", "sparsity", "active_per_block",
        "fit_seconds", "eval_seconds", "seeds", *(f"sd.{k}" for k in SPREAD),
    ]
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for method, row in rows.items():
        record = {"method": method}
        for t in tasks:
            record[f"accuracy.{t}"] = row["tasks"][t]["accuracy"]
            record[f"normalized_accuracy.{t}"] = row["tasks"][t]["normalized_accuracy"]
        record.update({k: row[k] for k in fields[1 + 2 * len(tasks):-1 - len(SPREAD)]})
        record["seeds"] = row.get("seeds", 1)
        record.update({f"sd.{k}": (row.get("sd") or {}).get(k) for k in SPREAD})
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return handle.getvalue()


def write_tables(
    rows: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], md_path: str | os.PathLike,
    csv_path: str | os.PathLike, title: str = "",
) -> None:
    """``table.md`` (human) and ``table.csv`` (one row per method, unformatted numbers), atomically."""
    with atomic_write(md_path) as handle:
        handle.write(to_markdown(rows, tasks, title))
    with atomic_write(csv_path, newline="") as handle:
        handle.write(to_csv(rows, tasks))
