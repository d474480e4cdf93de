"""The negation protocol's own steps (METHOD §8): task arithmetic ``θ0 − α τ_t`` with α chosen to keep the
control accuracy, VTVC's inclusion on target vs control inputs, and the per-target tables.

A negation problem (``problem.forget`` set) scores every task: the target (lower accuracy is better) and the
controls (the other tasks, each with its own head). Control accuracy is the mean of the control tasks'
accuracies; its share of zero-shot divides by the same mean for the pre-trained encoder.
"""

from __future__ import annotations

import copy
import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vtvc_pyro.experiment.problem import Context, Outcome, Problem
from vtvc_pyro.experiment.scoring import (
    CoefficientStats,
    encoder_predictor,
)
from vtvc_pyro.io import atomic_write
from vtvc_pyro.merge import task_arithmetic as task_arithmetic_merge
from vtvc_pyro.negation import CONTROL_KEEP, ForgetLikelihood, select_negation_alpha


def controls(problem: Problem) -> list[str]:
    """The control tasks of a negation problem: every task but the target."""
    return [t for t in problem.tasks if t != problem.forget]


def forgetting(model: Any, problem: Problem) -> ForgetLikelihood:
    """``model`` with the likelihood that asks the target's samples to forget (see ``vtvc_pyro.negation``)."""
    target = problem.tasks.index(problem.forget)
    return ForgetLikelihood(model, target, problem.heads[problem.forget].num_classes)


def _control_val_accuracy(ctx: Context, problem: Problem, encoder: torch.nn.Module) -> float:
    metrics = ctx.val_metrics(problem, encoder, controls(problem))
    return sum(m.accuracy for m in metrics.values()) / len(metrics)


def negated_task_arithmetic(ctx: Context, problem: Problem) -> Outcome:
    """``θ0 − α τ_target``, α the largest grid value whose control val accuracy stays ≥ 95 % of zero-shot."""
    bank = problem.bank
    with ctx.timer("fit"):
        work = copy.deepcopy(ctx.bench.visual)
        zeroshot = _control_val_accuracy(ctx, problem, ctx.bench.visual)
        control = {}
        grid = ctx.cfg.protocol.alpha_grid
        with ctx.progress_bar(len(grid), "α grid on val") as bar:
            for alpha in map(float, grid):
                work.load_state_dict(task_arithmetic_merge(bank, -alpha))
                control[alpha] = _control_val_accuracy(ctx, problem, work)
                bar.update(1)
        alpha = select_negation_alpha(control, zeroshot)
        work.load_state_dict(task_arithmetic_merge(bank, -alpha))
    with ctx.timer("eval"):
        scores = ctx.test_scores(problem, encoder_predictor(ctx.runtime.plain(work), problem.heads))
    details = {"alpha": alpha, "zeroshot_control_val_accuracy": zeroshot,
               "control_val_accuracy": {f"{a:g}": v for a, v in control.items()}}
    coef = CoefficientStats().add(torch.full((bank.num_tasks, bank.num_blocks), -alpha))
    return Outcome(scores, coef, details)


def inclusion_by_input(summary: Mapping[str, torch.Tensor], problem: Problem) -> dict[str, dict[str, float]]:
    """Mean inclusion probability, share of gates on, and mean coefficient of the negated components, over
    the target's and over the controls' samples of a ``Posterior.summarize`` output."""
    target = summary["task"] == problem.tasks.index(problem.forget)
    out = {}
    for name, rows in (("target", target), ("control", ~target)):
        out[name] = {key: float(summary[field][rows].double().mean())
                     for key, field in (("inclusion", "inclusion"), ("active", "gate"), ("coef", "coef"))}
    return out


# ---------------------------------------------------------------- tables


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def negation_rows(results: Mapping[str, Mapping[str, Any]], methods: Sequence[str]
                  ) -> dict[str, dict[str, dict[str, Any]]]:
    """``{target: {method: row}}`` from the methods' result files (their per-problem metrics and details)."""
    if "zeroshot" not in results:
        raise ValueError("methods: the negation table needs zeroshot (control accuracy is relative to it)")
    reference = results["zeroshot"]["problems"]
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    for target, zeroshot in reference.items():
        zeroshot_control = _mean([m["accuracy"] for t, m in zeroshot.items() if t != target])
        table = tables[target] = {}
        for method in methods:
            scored = results[method]["problems"][target]
            details = results[method]["details"].get(target, {})
            control = _mean([m["accuracy"] for t, m in scored.items() if t != target])
            inclusion = details.get("inclusion", {})
            table[method] = {
                "target_accuracy": scored[target]["accuracy"],
                "control_accuracy": control,
                "control_share_of_zeroshot": control / zeroshot_control if zeroshot_control else None,
                "alpha": details.get("alpha"),
                **{f"{key}_{side}": inclusion.get(side, {}).get(key)
                   for key in ("inclusion", "active") for side in ("target", "control")},
            }
    return tables


def mean_rows(tables: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{method: row}``: each number's mean over the targets (None where a target lacks it)."""
    per_target = list(tables.values())
    return {method: {key: (_mean([t[method][key] for t in per_target])
                           if all(t[method][key] is not None for t in per_target) else None)
                     for key in row}
            for method, row in per_target[0].items()}


COLUMNS = (("target_accuracy", "target acc ↓", "pct"), ("control_accuracy", "control acc", "pct"),
           ("control_share_of_zeroshot", "control / zero-shot", "pct"), ("alpha", "α", "2"),
           ("inclusion_target", "P(incl.) target", "2"), ("inclusion_control", "P(incl.) control", "2"),
           ("active_target", "gate on, target", "2"), ("active_control", "gate on, control", "2"))


def _fmt(value: float | None, kind: str) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{100 * value:.1f}" if kind == "pct" else f"{value:.2f}"


def to_markdown(tables: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str = "") -> str:
    """One table per target and one of the means over targets, methods as rows."""
    lines = [f"## {title}", ""] if title else []
    header = ["method", *(label for _, label, _ in COLUMNS)]
    sections = [(f"Target {target} (controls: {', '.join(t for t in tables if t != target)})", table)
                for target, table in tables.items()]
    for heading, table in [*sections, ("Mean over targets", mean_rows(tables))]:
        lines += [f"### {heading}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
        for method, row in table.items():
            lines.append("| " + " | ".join([method, *(_fmt(row[k], kind) for k, _, kind in COLUMNS)]) + " |")
        lines.append("")
    lines.append(
        "Test accuracies in %. Target accuracy: the negated task (lower is better); control accuracy: the "
        "mean over the other tasks, each with its own head, absolute and as a share of the zero-shot "
        f"encoder's. Task arithmetic subtracts α τ_target, α the largest grid value keeping control accuracy "
        f"on val ≥ {CONTROL_KEEP:.0%} of zero-shot. P(incl.) and gate on: VTVC's mean inclusion probability "
        "and share of gates on for the target's task vector, on the target's vs the controls' test inputs.")
    return "\n".join(lines) + "\n"


def write_tables(results: Mapping[str, Mapping[str, Any]], methods: Sequence[str],
                 md_path: str | os.PathLike, csv_path: str | os.PathLike, title: str = ""
                 ) -> dict[str, Any]:
    """``table.md`` (per-target tables) and ``table.csv`` (one row per target and method), atomically;
    returns the rows, per target and their means (for ``metrics.json``)."""
    tables = negation_rows(results, methods)
    with atomic_write(md_path) as handle:
        handle.write(to_markdown(tables, title))
    with atomic_write(csv_path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["target", "method", *(k for k, _, _ in COLUMNS)])
        writer.writeheader()
        for target, table in tables.items():
            for method, row in table.items():
                writer.writerow({"target": target, "method": method,
                                 **{k: "" if v is None else v for k, v in row.items()}})
    return {"targets": tables, "mean": mean_rows(tables)}
