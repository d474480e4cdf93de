"""PNG figures of a run, drawn from plain arrays and dicts and written atomically. Figures are built with
``matplotlib.figure.Figure`` (rendered by Agg), never through pyplot, so importing this module leaves the
caller's matplotlib backend alone."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from vtvc_pyro.io import atomic_path


def _save(fig: Figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def _short(name: str) -> str:
    return name.replace("transformer.resblocks.", "L").replace("_weight", ".w").replace("_bias", ".b")


def inclusion_heatmap(
    prob: np.ndarray, task_names: Sequence[str], block_names: Sequence[str], path: str | os.PathLike,
    title: str = "inclusion probability",
) -> None:
    """Tasks × blocks heatmap of ``prob`` (``[T, B]``, values in [0, 1])."""
    prob = np.asarray(prob, dtype=float)
    if prob.shape != (len(task_names), len(block_names)):
        raise ValueError(f"prob has shape {prob.shape}, expected ({len(task_names)}, {len(block_names)})")
    width = min(24.0, 3.0 + 0.12 * len(block_names))
    fig = Figure(figsize=(width, 1.2 + 0.35 * len(task_names)))
    ax = fig.subplots()
    image = ax.imshow(prob, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(task_names)), task_names)
    step = max(1, len(block_names) // 60)
    ticks = range(0, len(block_names), step)
    ax.set_xticks(ticks, [_short(block_names[i]) for i in ticks], rotation=90, fontsize=6)
    ax.set_xlabel("block")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    _save(fig, path)


def coefficient_distributions(
    coef: np.ndarray, sample_group: np.ndarray, vector_names: Sequence[str], group_names: Sequence[str],
    path: str | os.PathLike, title: str = "per-sample coefficients",
) -> None:
    """Left: per task vector, the distribution over samples of its block-averaged coefficient.
    Right: the mean of that coefficient over the samples of each group (rows: the samples' own task) and
    each task vector (columns). ``coef`` ``[N, T, B]``; ``sample_group`` ``[N]`` indexes ``group_names``."""
    coef = np.asarray(coef, dtype=float)
    sample_group = np.asarray(sample_group)
    if coef.ndim != 3 or coef.shape[1] != len(vector_names) or coef.shape[0] != sample_group.shape[0]:
        raise ValueError(
            f"coef must be [N, T={len(vector_names)}, B] with N = {sample_group.shape[0]}, got {coef.shape}"
        )
    per_vector = coef.mean(axis=2)  # [N, T]
    fig = Figure(figsize=(5.0 + 2.0 * len(vector_names), 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.violinplot([per_vector[:, t] for t in range(len(vector_names))], showmeans=True)
    left.set_xticks(range(1, len(vector_names) + 1), vector_names, rotation=45, ha="right")
    left.set_ylabel("mean coefficient over blocks")
    left.set_title(title)
    rows = [g for g in range(len(group_names)) if (sample_group == g).any()]
    means = np.stack([per_vector[sample_group == g].mean(axis=0) for g in rows])
    limit = max(float(np.abs(means).max()), 1e-6)
    image = right.imshow(means, cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
    right.set_yticks(range(len(rows)), [group_names[g] for g in rows])
    right.set_xticks(range(len(vector_names)), vector_names, rotation=45, ha="right")
    right.set_ylabel("samples of task")
    right.set_xlabel("task vector")
    fig.colorbar(image, ax=right, fraction=0.046, pad=0.04)
    _save(fig, path)


def reliability_diagram(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike,
                        bins: int = 15) -> None:
    """Accuracy against confidence per method: ``{method: {"confidence": [...], "accuracy": [...]}}`` with
    one entry per non-empty bin (see :func:`vtvc_pyro.evaluate.reliability_bins`)."""
    fig = Figure(figsize=(5.0, 5.0))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for method, curve in curves.items():
        ax.plot(curve["confidence"], curve["accuracy"], marker="o", markersize=3, label=method)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability ({bins} bins)")
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)


def accuracy_bars(
    accuracy: Mapping[str, Mapping[str, float]], path: str | os.PathLike, ylabel: str = "test accuracy"
) -> None:
    """Grouped bars: one group per task plus the mean, one bar per method (``{method: {task: acc}}``)."""
    methods = list(accuracy)
    tasks = list(dict.fromkeys(t for row in accuracy.values() for t in row))
    groups = [*tasks, "mean"]
    per_task = np.array([[accuracy[m].get(t, np.nan) for t in tasks] for m in methods])
    values = np.concatenate([per_task, np.nanmean(per_task, axis=1, keepdims=True)], axis=1)
    width = 0.8 / max(1, len(methods))
    fig = Figure(figsize=(max(6.0, 0.4 * len(groups) * max(1, len(methods))), 4.0))
    ax = fig.subplots()
    x = np.arange(len(groups))
    for i, method in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, values[i], width, label=method)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)


def layer_of(block: str) -> str:
    """The layer a parameter block belongs to: ``transformer.resblocks.3.attn.in_proj_weight`` →
    ``resblocks.3``; any other block → its first name component (``conv1``, ``ln_pre``, ``proj``)."""
    parts = block.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "resblocks" and parts[i + 1].isdigit():
            return f"resblocks.{parts[i + 1]}"
    return parts[0]


def by_layer(values: np.ndarray, block_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """``values [..., B]`` averaged over the blocks of each layer (layers in first-appearance order)."""
    layers = list(dict.fromkeys(layer_of(b) for b in block_names))
    which = np.array([layers.index(layer_of(b)) for b in block_names])
    values = np.asarray(values, dtype=float)
    return np.stack([values[..., which == k].mean(-1) for k in range(len(layers))], axis=-1), layers


def prior_posterior_inclusion(prior: np.ndarray, posterior: np.ndarray, task_names: Sequence[str],
                              layer_names: Sequence[str], path: str | os.PathLike, title: str) -> None:
    """Side-by-side tasks × layers heatmaps: prior inclusion π and mean posterior inclusion."""
    fig = Figure(figsize=(min(24.0, 4.0 + 0.5 * len(layer_names)), 1.8 + 0.7 * len(task_names)),
                 layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    names = ("prior π", "posterior mean sigmoid(ℓ)")
    for ax, values, name in zip(axes, (prior, posterior), names, strict=True):
        image = ax.imshow(np.asarray(values, dtype=float), aspect="auto", vmin=0, vmax=1, cmap="viridis",
                          interpolation="nearest")
        ax.set_xticks(range(len(layer_names)), layer_names, rotation=90, fontsize=7)
        ax.set_title(name)
        ax.set_xlabel("layer")
    axes[0].set_yticks(range(len(task_names)), task_names)
    fig.colorbar(image, ax=axes, fraction=0.025)
    fig.suptitle(title)
    _save(fig, path)


def credible_intervals(low: np.ndarray, mid: np.ndarray, high: np.ndarray, task_names: Sequence[str],
                       layer_names: Sequence[str], path: str | os.PathLike, title: str) -> None:
    """Per task vector, the median and credible interval of the coefficient in every layer (``[T, L]``)."""
    fig = Figure(figsize=(min(24.0, 3.0 + 0.4 * len(layer_names)), 2.0 + 1.6 * len(task_names)),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(task_names), 1, sharex=True, squeeze=False)[:, 0])
    x = np.arange(len(layer_names))
    for t, ax in enumerate(axes):
        ax.errorbar(x, mid[t], yerr=[mid[t] - low[t], high[t] - mid[t]], fmt="o", markersize=3, capsize=2)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_ylabel(task_names[t], fontsize=8)
    axes[-1].set_xticks(x, layer_names, rotation=90, fontsize=7)
    axes[0].set_title(title)
    _save(fig, path)


def accuracy_vs_sparsity(points: Mapping[str, tuple[float, float]], path: str | os.PathLike) -> None:
    """Mean test accuracy against sparsity (share of zero coefficients), one labelled point per method."""
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    for method, (sparsity, accuracy) in points.items():
        ax.scatter([sparsity], [accuracy])
        ax.annotate(method, (sparsity, accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel("sparsity (share of gated-off components)")
    ax.set_ylabel("mean test accuracy")
    ax.set_title("accuracy vs sparsity")
    _save(fig, path)


def objective_curves(curves: Mapping[str, Sequence[float]], path: str | os.PathLike) -> None:
    """The objective each learned method optimised, per step and datum: the tempered ELBO (log-likelihood
    − kl_scale · KL; for the deterministic baselines, the log-likelihood)."""
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.subplots()
    for method, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=method, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("tempered ELBO per datum")
    ax.set_title("training objective")
    ax.legend(fontsize=7)
    _save(fig, path)
