"""The figures of a run directory, drawn from its result and posterior files (so a resumed or finished run
can be re-plotted): accuracy per method, reliability, and per VTVC method the tasks × blocks inclusion and
gate-activity heatmaps and the per-sample coefficient distributions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vtvc_pyro.experiment import plots
from vtvc_pyro.experiment.config import ExperimentConfig
from vtvc_pyro.experiment.rundir import RunDirectory

POSTERIOR_METHODS = ("vtvc", "vtvc_stochastic", "vtvc_gaussian")


def load_samples(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A ``samples.safetensors`` written by a VTVC method: per test sample ``inclusion``, ``loc``,
    ``scale``, ``gate``, ``coef`` ``[N, T, B]`` and ``task``, ``label``, ``confidence``, ``correct``,
    ``entropy`` ``[N]``; metadata ``task_names`` (task vectors), ``block_names``, ``data_tasks`` (what
    ``task`` indexes)."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
        meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
    return tensors, meta


def posterior_samples(run: RunDirectory, method: str) -> dict[str, Path]:
    """``{problem: samples.safetensors}`` of a VTVC method in a run directory."""
    root = run.posterior_dir(method)
    return {p.name: p / "samples.safetensors" for p in sorted(root.glob("*"))
            if (p / "samples.safetensors").is_file()}


def draw_figures(run: RunDirectory, cfg: ExperimentConfig, results: Mapping[str, Mapping[str, Any]],
                 rows: Mapping[str, Mapping[str, Any]], tasks: list[str]) -> list[Path]:
    """Draw every figure of the run into ``plots/``; returns the paths."""
    out = run.plots_dir
    written = [out / "accuracy.png", out / "reliability.png"]
    plots.accuracy_bars({m: {t: rows[m]["tasks"][t]["accuracy"] for t in tasks} for m in rows}, written[0])
    plots.reliability_diagram({m: results[m]["reliability"] for m in rows}, written[1], cfg.eval.ece_bins)
    for method in rows:
        if results[method]["runs"] not in POSTERIOR_METHODS:
            continue
        for problem, path in posterior_samples(run, method).items():
            samples, meta = load_samples(path)
            stem = method if problem == "all" else f"{method}_{problem}"
            if not bool((samples["inclusion"] == 1).all()):  # a spike: inclusion and gating are informative
                written.append(out / f"{stem}_inclusion.png")
                plots.inclusion_heatmap(samples["inclusion"].mean(0).numpy(), meta["task_names"],
                                        meta["block_names"], written[-1],
                                        f"{method}: mean inclusion probability sigmoid(ℓ) over test samples")
                written.append(out / f"{stem}_active.png")
                plots.inclusion_heatmap(samples["gate"].mean(0).numpy(), meta["task_names"],
                                        meta["block_names"], written[-1],
                                        f"{method}: share of test samples whose gate keeps the component")
            written.append(out / f"{stem}_coefficients.png")
            plots.coefficient_distributions(samples["coef"].numpy(), samples["task"].numpy(),
                                            meta["task_names"], meta["data_tasks"], written[-1],
                                            f"{method}: per-sample coefficients (test)")
    return written
