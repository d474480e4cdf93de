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
from safetensors import safe_open

from vtvc_pyro.baselines import ATLASModel, MetaNetModel
from vtvc_pyro.device import resolve_device, torch_threads
from vtvc_pyro.experiment.benchmark import Benchmark, load_benchmark
from vtvc_pyro.experiment.config import ExperimentConfig, load_config, variant_config
from vtvc_pyro.experiment.problem import FeatureCache, Problem, Runtime, make_problems
from vtvc_pyro.experiment.scoring import Predict, predict_dataset, scores_from_probs
from vtvc_pyro.guide import build_guide
from vtvc_pyro.inference import load_fitted
from vtvc_pyro.model import VTVCModel
from vtvc_pyro.posterior import Posterior, coefficient_predictor
from vtvc_pyro.priors import PriorSpec

VTVC_FAMILY = ("vtvc", "vtvc_gaussian", "vtvc_stochastic")
POINT_METHODS = ("atlas", "metanet")


def _fitted_metadata(path: Path) -> dict[str, object]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}


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
            out = {"accuracy": sum(m.accuracy for m in tasks.values()) / len(tasks),
                   "nll": sum(m.nll for m in tasks.values()) / len(tasks)}
            if split == "test":
                out["normalized_accuracy"] = sum(tasks[t].accuracy / reference[t] for t in tasks) / len(tasks)
            return out

        def add(method: str, rule: str, predict: Predict, splits: tuple[str, ...] = ("fit", "test")) -> None:
            row = {"method": method, "rule": rule}
            for split in splits:
                row.update({f"{split} {k}": v for k, v in scores(predict, split).items()})
            rows.append(row)

        for name in metrics["methods"]:
            base = cfg.variants[name].method if name in cfg.variants else name
            path = run_dir / "posteriors" / name / problem.name / seed_dir / "fitted.safetensors"
            if base not in POINT_METHODS + VTVC_FAMILY or not path.is_file():
                continue
            if base in POINT_METHODS:
                model = _point_model(base, variant_config(cfg, name), runtime, bench, problem, features)
                load_fitted(model, path)
                add(name, "point", coefficient_predictor(model.frozen, model.point_coef))
                continue
            settings, meta = variant_config(cfg, name), _fitted_metadata(path)
            prior = PriorSpec.from_mapping(meta["prior"])
            bank = problem.bank
            model = VTVCModel(runtime.composed(bench.visual, bank), problem.heads, prior, bank.task_names,
                              bank.block_names)
            guide = build_guide(settings.guide, features(problem, "fit").shape[1], bank.task_names,
                                bank.block_names, prior, gating=str(meta["gating"]))
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


def _point_model(base: str, cfg: ExperimentConfig, runtime: Runtime, bench: Benchmark, problem: Problem,
                 features: FeatureCache) -> ATLASModel | MetaNetModel:
    bank = problem.bank
    encoder = runtime.composed(bench.visual, bank)
    if base == "atlas":
        return ATLASModel(encoder, problem.heads, bank.task_names, bank.block_names)
    return MetaNetModel(encoder, problem.heads, features(problem, "fit").shape[1], bank.task_names,
                        bank.block_names, hidden_dim=cfg.guide.hidden_dim, init_coef=cfg.guide.init_loc)


def to_markdown(table: pd.DataFrame) -> str:
    """The diagnosis as a Markdown table: accuracies in %, NLL to three decimals."""
    columns = list(table.columns)
    lines = ["| method | rule | " + " | ".join(columns) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in columns) + " |"]
    for (method, rule), row in table.iterrows():
        cells = [f"{100 * row[c]:.1f}" if "accuracy" in c else f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {method} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
