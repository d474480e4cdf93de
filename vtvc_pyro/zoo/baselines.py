"""The zoo's reference numbers: zero-shot, individually fine-tuned, task arithmetic and TIES-merging
(α chosen on val over {0, 0.05, …, 1} by mean normalised accuracy, reported on test)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from vtvc_pyro.evaluate import (
    TaskMetrics,
    evaluate_encoder,
    results_table,
    select_alpha,
    table_to_markdown,
)
from vtvc_pyro.zoo.store import Zoo

METHODS = ("zeroshot", "finetuned", "task_arithmetic", "ties")


def evaluate_baselines(zoo: Zoo, batch_size: int = 500, ties_top_k: float = 0.2,
                       progress: Callable[[str], None] | None = None) -> dict:
    """Score the four baselines on every task's val and test splits.

    Returns ``{"results": {split: {method: {task: metrics dict}}}, "alpha": {method: α},
    "alpha_scores": {method: {α: mean normalised val accuracy}}}``.
    """
    from vtvc_pyro.checkpoints import load_state_dict
    from vtvc_pyro.merge import task_arithmetic, ties_merging

    visual = zoo.create_model().visual.eval()
    splits = {s: {t: zoo.split(t, s) for t in zoo.task_names} for s in ("val", "test")}

    def encode(images: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return visual(images)

    def score(state_dict: Mapping[str, torch.Tensor], split: str, tasks=None) -> dict[str, TaskMetrics]:
        visual.load_state_dict(state_dict)
        chosen = {t: splits[split][t] for t in (tasks or zoo.task_names)}
        return evaluate_encoder(encode, zoo.heads, chosen, batch_size)

    def note(message: str) -> None:
        if progress is not None:
            progress(message)

    results: dict[str, dict[str, dict[str, TaskMetrics]]] = {"val": {}, "test": {}}
    theta0 = load_state_dict(zoo.pretrained_path)
    for split in results:
        results[split]["zeroshot"] = score(theta0, split)
    note("zero-shot")
    for split in results:
        results[split]["finetuned"] = {}
    for task, path in zoo.finetuned_paths.items():
        theta = load_state_dict(path)
        for split in results:
            results[split]["finetuned"].update(score(theta, split, [task]))
    note("fine-tuned")

    bank = zoo.bank()
    merges = {"task_arithmetic": lambda a: task_arithmetic(bank, a),
              "ties": lambda a: ties_merging(bank, top_k=ties_top_k, alpha=a)}
    alphas, alpha_scores = {}, {}
    for method, merge in merges.items():
        chosen = select_alpha(lambda a, merge=merge: score(merge(a), "val"), results["val"]["finetuned"])
        results["val"][method] = chosen.metrics
        results["test"][method] = score(merge(chosen.alpha), "test")
        alphas[method], alpha_scores[method] = chosen.alpha, chosen.scores
        note(method)
    return {
        "results": {s: {m: {t: v.to_dict() for t, v in r.items()} for m, r in rs.items()}
                    for s, rs in results.items()},
        "alpha": alphas,
        "alpha_scores": alpha_scores,
    }


def zoo_table(zoo: Zoo, split: str = "test"):
    """The recorded baselines of ``zoo`` as a results table (pandas DataFrame, accuracies in %)."""
    recorded = zoo.manifest.get("results", {}).get(split)
    if not recorded:
        raise KeyError(f"zoo at {zoo.root} has no recorded {split} results")
    rows = {m: {t: TaskMetrics.from_dict(v) for t, v in recorded[m].items()}
            for m in METHODS if m in recorded}
    return results_table(rows, rows["finetuned"])


def summarize_zoo(zoo: Zoo, split: str = "test") -> str:
    """A Markdown table of the zoo's baselines on ``split``, with the chosen merge coefficients."""
    table = zoo_table(zoo, split)
    alphas = zoo.manifest.get("alpha", {})
    labels = {m: f"{m} (α={alphas[m]:g})" if m in alphas else m for m in table.index}
    table = table.rename(index=labels)
    return f"{zoo.preset} zoo, {split} split, accuracies in %\n\n{table_to_markdown(table)}"
