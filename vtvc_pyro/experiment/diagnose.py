"""Where a finished task-addition run's learned methods stand on the data they were fitted on and on test,
under every evaluation rule of METHOD §7: underfitting (low fit-data accuracy) and overfitting (a large gap
to test) tell apart what a comparison table alone does not (``vtvc diagnose RUN``).

Every learned method is rebuilt from its ``fitted.safetensors`` (the VTVC family from the prior and gating
recorded there). Rules: ``point`` (aTLAS, meta-network: their coefficients); for the VTVC family ``gated``
(``1[p_eff ≥ 0.5] · μ``, what the run scores), ``mean`` (``μ``: every gate on) and ``mc`` (the Monte Carlo
predictive mean over ``mc_samples`` guide draws). The fit data are the union of the val splits the methods
were fitted on; normalised test accuracy divides by the fine-tuned models' test accuracy, as the tables do.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyro
import torch

from vtvc_pyro.checkpoints import read_metadata
from vtvc_pyro.device import resolve_device, torch_threads
from vtvc_pyro.experiment.benchmark import load_benchmark
from vtvc_pyro.experiment.config import base_method, load_config, variant_config
from vtvc_pyro.experiment.methods import baseline_model, vtvc_parts
from vtvc_pyro.experiment.problem import FeatureCache, Runtime, make_problems
from vtvc_pyro.experiment.report import summarize
from vtvc_pyro.experiment.scoring import Predict, predict_dataset, scores_from_probs
from vtvc_pyro.inference import load_fitted
from vtvc_pyro.posterior import Posterior, coefficient_predictor
from vtvc_pyro.priors import PriorSpec

VTVC_FAMILY = ("vtvc", "vtvc_gaussian", "vtvc_stochastic")
POINT_METHODS = ("atlas", "metanet")


def diagnose(run_dir: str | Path, seed: int | None = None, mc_samples: int = 8) -> pd.DataFrame:
    """One row per (method, rule): accuracy and NLL (means over tasks) on the fit data and on test, and the
    normalised test accuracy; ``seed``: which of the run's fit seeds (default: its first)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: not found; is {run_dir} a finished vtvc run?")
    metrics = json.loads(metrics_path.read_text())
    cfg = load_config(run_dir / "config.yaml")
    if cfg.protocol.name != "task_addition":
        raise ValueError(f"{run_dir}: protocol {cfg.protocol.name!r}; diagnose reads task-addition runs")
    seeds = cfg.fit_seeds
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise ValueError(f"seed: {seed} is not among the run's fit seeds {list(seeds)}")
    seed_dir = "" if seed == seeds[0] else f"seed-{seed}"
    if "finetuned" not in metrics["methods"]:
        raise ValueError(f"{metrics_path}: has no finetuned row to normalise by")
    reference = {t: m["accuracy"] for t, m in metrics["methods"]["finetuned"]["tasks"].items()}

    device = resolve_device(cfg.device)
    runtime = Runtime(device, cfg.precision, cfg.loader.loader_config())
    rows = []
    with torch_threads(cfg.threads):
        bench = load_benchmark(cfg, lambda _: None).place(device, cfg.bank_dtype, rank=cfg.bank_rank,
                                                         energy=cfg.bank_energy)
        features = FeatureCache(bench.visual, cfg.eval.batch_size, runtime)
        problem = make_problems(cfg, bench)[0]

        def scores(predict: Predict, split: str) -> dict[str, float]:
            probs, labels, task = predict_dataset(predict, problem.joined(split), cfg.eval.batch_size,
                                                  device=device, loader=runtime.loader)
            tasks = scores_from_probs(probs, labels, task, problem.heads, cfg.eval.ece_bins).tasks
            summary = summarize({split: {"tasks": {t: m.to_dict() for t, m in tasks.items()}}}, list(tasks),
                                reference)[split]  # the means the run's tables report
            out = {"accuracy": summary["mean_accuracy"], "nll": summary["nll"]}
            if split == "test":
                out["normalized_accuracy"] = summary["mean_normalized_accuracy"]
            return out

        def add(method: str, rule: str, predict: Predict, splits: tuple[str, ...] = ("fit", "test")) -> None:
            row = {"method": method, "rule": rule}
            for split in splits:
                row.update({f"{split} {k}": v for k, v in scores(predict, split).items()})
            rows.append(row)

        feature_dim = features(problem, "fit").shape[1]
        for name in metrics["methods"]:
            base = base_method(cfg, name)
            path = run_dir / "posteriors" / name / problem.name / seed_dir / "fitted.safetensors"
            if base not in POINT_METHODS + VTVC_FAMILY or not path.is_file():
                continue
            settings, encoder = variant_config(cfg, name), runtime.composed(bench.visual, problem.bank)
            if base in POINT_METHODS:
                model = load_fitted(baseline_model(base, settings, encoder, problem, feature_dim), path)
                add(name, "point", coefficient_predictor(model.frozen, model.point_coef))
                continue
            meta = read_metadata(path)  # _save_fit's JSON-encoded values
            prior, gating = PriorSpec.from_mapping(json.loads(meta["prior"])), json.loads(meta["gating"])
            model, guide = vtvc_parts(settings, encoder, problem, prior, gating, feature_dim)
            load_fitted(guide, path)
            post = Posterior(model, guide, batch_size=cfg.eval.batch_size, device=device,
                             loader=runtime.loader)
            add(name, "gated", post.predict)
            add(name, "mean", coefficient_predictor(model.frozen, _all_on(guide)))
            if mc_samples:
                pyro.set_rng_seed(seed)
                add(name, f"mc{mc_samples}", functools.partial(post.predict, num_samples=mc_samples))
    if not rows:
        raise ValueError(f"{run_dir}: no fitted aTLAS, meta-network or VTVC method for seed {seed}")
    return pd.DataFrame(rows).set_index(["method", "rule"])


def _all_on(guide: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    @torch.no_grad()
    def coef(features0: torch.Tensor) -> torch.Tensor:
        return guide.components(features0)[1]

    return coef


def to_markdown(table: pd.DataFrame) -> str:
    """The diagnosis as a Markdown table: accuracies in %, NLL to three decimals."""
    columns = list(table.columns)
    lines = ["| method | rule | " + " | ".join(columns) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in columns) + " |"]
    for (method, rule), row in table.iterrows():
        cells = [f"{100 * row[c]:.1f}" if "accuracy" in c else f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {method} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
