"""The figures of a run directory, drawn from its files alone (so ``vtvc plot RUN`` redraws a finished or
resumed run): accuracy per method, reliability, accuracy vs sparsity, training curves, and per VTVC method
(from its ``posterior.nc``) prior vs posterior inclusion per task × layer, coefficient credible intervals,
gate activity and the per-sample coefficient distributions."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vtvc_pyro.experiment import plots
from vtvc_pyro.experiment.rundir import RunDirectory

CREDIBLE_MASS = 0.9


def load_posterior(path: str | Path) -> Any:
    """A VTVC method's ``posterior.nc`` as ArviZ ``InferenceData`` (see ``Posterior.to_inference_data``)."""
    import arviz as az

    return az.from_netcdf(str(path))


def posterior_files(run: RunDirectory, method: str) -> dict[str, Path]:
    """``{problem: posterior.nc}`` of a method in a run directory (empty for methods without one)."""
    root = run.posterior_dir(method)
    return {p.parent.name: p for p in sorted(root.glob("*/posterior.nc"))}


def _elbo(path: Path) -> list[float]:
    with open(path, newline="") as handle:
        return [float(row["tempered_elbo"]) for row in csv.DictReader(handle)]


def _posterior_figures(run: RunDirectory, method: str, problem: str, path: Path) -> list[Path]:
    idata = load_posterior(path)
    post, const = idata.posterior, idata.constant_data
    tasks, blocks = [str(t) for t in post["task"].values], [str(b) for b in post["block"].values]
    stem = run.plots_dir / (method if problem == "all" else f"{method}_{problem}")
    written = []
    coef = post["coef"].values.reshape(-1, *post["coef"].shape[2:])  # [draws, N, T, B]
    if not bool((const["inclusion"].values == 1).all()):  # a spike: inclusion and gating are informative
        prior, layers = plots.by_layer(const["prior_inclusion"].values, blocks)
        posterior, _ = plots.by_layer(const["inclusion"].values.mean(0), blocks)
        written.append(Path(f"{stem}_inclusion.png"))
        plots.prior_posterior_inclusion(prior, posterior, tasks, layers, written[-1],
                                        f"{method}: inclusion per task vector and layer")
        written.append(Path(f"{stem}_active.png"))
        plots.inclusion_heatmap(const["decision"].values.mean(0), tasks, blocks, written[-1],
                                f"{method}: share of test samples whose gate keeps the component")
    per_layer, layers = plots.by_layer(coef, blocks)  # [draws, N, T, L]
    flat = per_layer.reshape(-1, *per_layer.shape[2:])
    tail = (1 - CREDIBLE_MASS) / 2
    low, mid, high = np.quantile(flat, [tail, 0.5, 1 - tail], axis=0)
    written.append(Path(f"{stem}_intervals.png"))
    plots.credible_intervals(low, mid, high, tasks, layers, written[-1],
                             f"{method}: coefficient per layer, median and {CREDIBLE_MASS:.0%} credible "
                             "interval (draws × test samples)")
    data_task = [str(t) for t in const["data_task"].values]
    groups = list(dict.fromkeys(data_task))
    written.append(Path(f"{stem}_coefficients.png"))
    group_ids = np.array([groups.index(t) for t in data_task])
    plots.coefficient_distributions((const["decision"] * const["loc"]).values, group_ids, tasks, groups,
                                    written[-1], f"{method}: per-sample coefficients (test)")
    return written


def draw_figures(run: RunDirectory | str | Path) -> list[Path]:
    """Draw every figure of a run directory into ``plots/``; returns the paths."""
    run = run if isinstance(run, RunDirectory) else RunDirectory(run)
    metrics_path = run.root / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: not found; is {run.root} a finished vtvc run?")
    metrics = json.loads(metrics_path.read_text())
    config = yaml.safe_load((run.root / "config.yaml").read_text()) or {}
    rows, tasks = metrics["methods"], metrics["tasks"]
    results = {m: json.loads(run.result_path(m).read_text()) for m in rows}
    out = run.plots_dir
    written = [out / "accuracy.png", out / "reliability.png"]
    plots.accuracy_bars({m: {t: rows[m]["tasks"][t]["accuracy"] for t in tasks} for m in rows}, written[0])
    plots.reliability_diagram({m: results[m]["reliability"] for m in rows}, written[1],
                              config.get("eval", {}).get("ece_bins", 15))
    sparse = {m: (r["sparsity"], r["mean_accuracy"]) for m, r in rows.items()
              if r.get("sparsity") is not None}
    if sparse:
        written.append(out / "accuracy_vs_sparsity.png")
        plots.accuracy_vs_sparsity(sparse, written[-1])
    curves = {f"{m}" + ("" if p.parent.name == "all" else f"/{p.parent.name}"): _elbo(p)
              for m in rows for p in sorted(run.posterior_dir(m).glob("*/elbo.csv"))}
    if curves:
        written.append(out / "objective.png")
        plots.objective_curves(curves, written[-1])
    for method in rows:
        for problem, path in posterior_files(run, method).items():
            written += _posterior_figures(run, method, problem, path)
    return written
