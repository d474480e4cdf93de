"""The compared methods (METHOD §8), each ``method(ctx, problem) -> Outcome`` on the problem's bank, heads
and splits. Merged weights are scored as a plain open_clip tower; sample-specific coefficients through the
composed encoder. The Pyro methods save their fitted parameters and posterior summaries as they finish."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vtvc_pyro.baselines import ATLASModel, MetaNetModel, empty_guide
from vtvc_pyro.compose import ComposedEncoder
from vtvc_pyro.data import MultiTaskDataset
from vtvc_pyro.evaluate import TaskMetrics, evaluate_encoder, select_alpha
from vtvc_pyro.experiment.config import BaselineSettings, SVISettings
from vtvc_pyro.experiment.problem import Context, Outcome, Problem
from vtvc_pyro.experiment.scoring import (
    CoefficientStats,
    Predict,
    Scores,
    encoder_predictor,
    predict_dataset,
    scores_from_probs,
)
from vtvc_pyro.gating import ImportanceUncertaintyFilter
from vtvc_pyro.guide import UNGATED, AmortizedGuide, GateSlabGuide, TaskLevelGuide
from vtvc_pyro.inference import PER_DATUM, STEP_FIELDS, FitResult, SVIConfig, fit_svi
from vtvc_pyro.io import atomic_path, atomic_write
from vtvc_pyro.merge import task_arithmetic as task_arithmetic_merge
from vtvc_pyro.merge import ties_merging
from vtvc_pyro.model import VTVCModel
from vtvc_pyro.posterior import Posterior, coefficient_predictor

Method = Callable[[Context, Problem], Outcome]


# ---------------------------------------------------------------- shared steps


def _scores(ctx: Context, problem: Problem, predict: Predict, splits: Mapping[str, Any] | None = None
            ) -> Scores:
    """Scores of ``predict`` on the problem's test splits (or on ``splits``)."""
    data = problem.joined("test") if splits is None else MultiTaskDataset(splits, problem.tasks)
    probs, labels, task = predict_dataset(predict, data, ctx.cfg.eval.batch_size)
    return scores_from_probs(probs, labels, task, problem.heads, ctx.cfg.eval.ece_bins)


def _val_metrics(ctx: Context, problem: Problem, encoder: torch.nn.Module, tasks: list[str] | None = None
                 ) -> dict[str, TaskMetrics]:
    splits = {t: problem.val[t] for t in (tasks or problem.tasks)}
    return evaluate_encoder(lambda images, _ids: encoder(images), problem.heads, splits,
                            ctx.cfg.eval.batch_size)


def _svi_config(ctx: Context, settings: SVISettings | BaselineSettings) -> SVIConfig:
    svi = ctx.cfg.svi
    bayesian = isinstance(settings, SVISettings)
    return SVIConfig(
        steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, lr_decay=svi.lr_decay,
        clip_norm=svi.clip_norm, elbo=svi.elbo if bayesian else "trace",
        num_particles=svi.num_particles if bayesian else 1, kl_weight=svi.kl_weight if bayesian else 1.0,
        kl_anneal_steps=svi.kl_anneal_steps if bayesian else 0, seed=ctx.cfg.seed,
        checkpoint_every=svi.checkpoint_every, feature_batch_size=ctx.cfg.eval.batch_size,
        progress=ctx.progress,
    )


def _fit(ctx: Context, problem: Problem, model: torch.nn.Module, guide: Callable,
         settings: SVISettings | BaselineSettings) -> FitResult:
    """SVI on the problem's fit data, continuing from the method's checkpoint if a previous run left one."""
    fit = fit_svi(model, guide, problem.joined("fit"), _svi_config(ctx, settings),
                  features0=ctx.features(problem, "fit"), checkpoint_path=ctx.checkpoint_path(problem))
    if fit.start_step:
        ctx.log(f"{ctx.name}/{problem.name}: resumed SVI from its checkpoint at step {fit.start_step}")
    return fit


def _fit_details(fit: FitResult) -> dict[str, Any]:
    final = {f"final_{name}_per_datum": getattr(fit.history[-1], name) for name in PER_DATUM}
    return {"steps": fit.steps, "resumed_from_step": fit.start_step, **final}


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
                  ) -> None:
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def _save_fit(ctx: Context, problem: Problem, module: torch.nn.Module, fit: FitResult,
              metadata: Mapping[str, Any]) -> None:
    """``fitted.safetensors`` (the module's parameters and buffers) and ``elbo.csv`` (per step)."""
    out = ctx.artifact_dir(problem)
    meta = {"task_names": problem.bank.task_names, "block_names": problem.bank.block_names, **metadata}
    _save_tensors(out / "fitted.safetensors", module.state_dict(), meta)
    with atomic_write(out / "elbo.csv", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(STEP_FIELDS)
        writer.writerows(dataclasses.astuple(record) for record in fit.history)


def _merged_scores(ctx: Context, problem: Problem, merge: Callable[[float], dict]) -> Outcome:
    """Choose α on val by mean normalised accuracy, then score the merged tower on test once. Tasks whose
    fine-tuned model scores 0 on val cannot be normalised and are left out of the choice (with a note)."""
    reference = ctx.finetuned_val_accuracy(problem)
    usable = [t for t in problem.tasks if reference[t] > 0]
    if not usable:
        raise ValueError(f"{problem.name}: every fine-tuned model scores 0 on its val split; α cannot be "
                         "chosen by normalised accuracy (protocol.max_fit_per_task too small?)")
    if len(usable) < len(problem.tasks):
        ctx.log(f"{ctx.name}: fine-tuned val accuracy is 0 for {sorted(set(problem.tasks) - set(usable))}; "
                "α is chosen on the other tasks")
    work = copy.deepcopy(ctx.bench.visual)

    def at(alpha: float) -> dict[str, TaskMetrics]:
        work.load_state_dict(merge(alpha))
        return _val_metrics(ctx, problem, work, usable)

    start = time.perf_counter()
    chosen = select_alpha(at, {t: reference[t] for t in usable}, ctx.cfg.protocol.alpha_grid)
    fitted = time.perf_counter()
    work.load_state_dict(merge(chosen.alpha))
    scores = _scores(ctx, problem, encoder_predictor(work, problem.heads))
    details = {"alpha": chosen.alpha, "val_score": chosen.score,
               "val_scores": {f"{a:g}": s for a, s in chosen.scores.items()}}
    return Outcome(scores, fitted - start, time.perf_counter() - fitted, details=details)


# ---------------------------------------------------------------- references and classic merges


def zeroshot(ctx: Context, problem: Problem) -> Outcome:
    """The pre-trained encoder θ0."""
    start = time.perf_counter()
    scores = _scores(ctx, problem, encoder_predictor(ctx.bench.visual, problem.heads))
    return Outcome(scores, 0.0, time.perf_counter() - start)


def finetuned(ctx: Context, problem: Problem) -> Outcome:
    """Each task's own fine-tuned encoder θ_t: the upper bound that normalises accuracy (val and test)."""
    work = copy.deepcopy(ctx.bench.visual)
    parts, val_accuracy = [], {}
    start = time.perf_counter()
    for task in problem.tasks:
        work.load_state_dict(ctx.bench.finetuned_state_dict(task))
        val_accuracy[task] = _val_metrics(ctx, problem, work, [task])[task].accuracy
        predict = encoder_predictor(work, problem.heads)
        parts.append(_scores(ctx, problem, predict, {task: problem.test[task]}))
    details = {"val_accuracy": val_accuracy}
    return Outcome(Scores.concat(parts), 0.0, time.perf_counter() - start, details=details)


def task_arithmetic(ctx: Context, problem: Problem) -> Outcome:
    """θ0 + α Σ_t τ_t, α chosen on val."""
    bank = problem.bank
    outcome = _merged_scores(ctx, problem, lambda alpha: task_arithmetic_merge(bank, alpha))
    alpha = outcome.details["alpha"]
    outcome.coef = CoefficientStats().add(torch.full((bank.num_tasks, bank.num_blocks), alpha))
    return outcome


def ties(ctx: Context, problem: Problem) -> Outcome:
    """TIES-merging (top-k trim, sign election, disjoint mean), scaled by α chosen on val."""
    bank = problem.bank
    base = bank.pretrained_state_dict()
    full = ties_merging(bank, top_k=ctx.cfg.protocol.ties_top_k, alpha=1.0)  # θ0 + merged τ

    def merge(alpha: float) -> dict[str, torch.Tensor]:
        return {k: base[k] + alpha * (full[k] - base[k]) if base[k].is_floating_point() else base[k]
                for k in base}

    return _merged_scores(ctx, problem, merge)


# ---------------------------------------------------------------- learned coefficients


def _learned(ctx: Context, problem: Problem, model: ATLASModel | MetaNetModel) -> Outcome:
    """A deterministic baseline fitted by cross-entropy (SVI with an empty guide) and scored on test."""
    fit = _fit(ctx, problem, model, empty_guide, ctx.cfg.baselines)
    start = time.perf_counter()
    scores = _scores(ctx, problem, coefficient_predictor(model.frozen, model.point_coef))
    stats = CoefficientStats().add(model.point_coef(ctx.features(problem, "test")))
    eval_seconds = time.perf_counter() - start
    _save_fit(ctx, problem, model, fit, {"method": ctx.name})
    return Outcome(scores, fit.seconds, eval_seconds, stats, _fit_details(fit))


def atlas(ctx: Context, problem: Problem) -> Outcome:
    """aTLAS: task-level λ ∈ R^{T×B}, initialised at 0, learned by cross-entropy on the fit data."""
    bank = problem.bank
    encoder = ComposedEncoder(ctx.bench.visual, bank)
    return _learned(ctx, problem, ATLASModel(encoder, problem.heads, bank.task_names, bank.block_names))


def metanet(ctx: Context, problem: Problem) -> Outcome:
    """The deterministic meta-network: the guide's g_φ outputs λ_n directly, cross-entropy only."""
    bank = problem.bank
    encoder = ComposedEncoder(ctx.bench.visual, bank)
    model = MetaNetModel(encoder, problem.heads, ctx.features(problem, "fit").shape[1], bank.task_names,
                         bank.block_names, hidden_dim=ctx.cfg.guide.hidden_dim,
                         init_coef=ctx.cfg.guide.init_loc)
    return _learned(ctx, problem, model)


# ---------------------------------------------------------------- VTVC


def gaussian_prior(prior: Mapping[str, Any]) -> dict[str, Any]:
    """The spike-free counterpart of a prior mapping: the same slab (and slab overrides), no spike."""
    out: dict[str, Any] = {"kind": "gaussian"}
    if "slab" in prior:
        out["slab"] = dict(prior["slab"])
    overrides = [{k: v for k, v in o.items() if k in ("tasks", "blocks", "slab")}
                 for o in prior.get("overrides") or () if "slab" in o]
    if overrides:
        out["overrides"] = overrides
    return out


def _guide(ctx: Context, problem: Problem, prior: Mapping[str, Any], gating: str, feature_dim: int
           ) -> GateSlabGuide:
    g = ctx.cfg.guide
    names = (problem.bank.task_names, problem.bank.block_names)
    gate_filter = ImportanceUncertaintyFilter(g.tau0, g.beta, g.sharpness)
    common = {"prior": prior, "gating": gating, "gate_filter": gate_filter, "temperature": g.temperature,
              "init_loc": g.init_loc, "init_scale": g.init_scale, "init_prob": g.init_prob}
    if g.kind == "amortized":
        return AmortizedGuide(feature_dim, *names, hidden_dim=g.hidden_dim, **common)
    return TaskLevelGuide(*names, **common)


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(probs, probs).sum(-1)


def _vtvc(ctx: Context, problem: Problem, prior: Mapping[str, Any], gating: str) -> Outcome:
    """Fit the VTVC guide by SVI, score its gated (or Monte Carlo) prediction, save the posterior."""
    bank = problem.bank
    model = VTVCModel(ComposedEncoder(ctx.bench.visual, bank), problem.heads, prior, bank.task_names,
                      bank.block_names)
    guide = _guide(ctx, problem, prior, gating, ctx.features(problem, "fit").shape[1])
    fit = _fit(ctx, problem, model, guide, ctx.cfg.svi)

    start = time.perf_counter()
    post = Posterior(model, guide, batch_size=ctx.cfg.eval.batch_size)
    test, test_features = problem.joined("test"), ctx.features(problem, "test")
    samples = ctx.cfg.eval.mc_samples
    extra: dict[str, torch.Tensor] = {}
    if samples:
        pred = post.predictive(test, samples, test_features)
        probs, labels, task = pred["probs"].double(), pred["labels"], pred["task"]
        extra["mutual_information"] = pred["mutual_information"]
    else:
        probs, labels, task = predict_dataset(post.predict, test, ctx.cfg.eval.batch_size)
    scores = scores_from_probs(probs, labels, task, problem.heads, ctx.cfg.eval.ece_bins)
    summary = post.summarize(test, test_features)
    eval_seconds = time.perf_counter() - start

    out = ctx.artifact_dir(problem)
    task_coef = post.task_coefficients(post.summarize(problem.joined("val"), ctx.features(problem, "val")))
    _save_tensors(out / "task_coef.safetensors", task_coef, {"block_names": bank.block_names,
                                                            "task_names": bank.task_names})
    confidence, predicted = probs.max(-1)
    _save_tensors(out / "samples.safetensors", {
        **{k: summary[k].float() for k in ("inclusion", "loc", "scale", "gate", "coef")},
        "task": task, "label": labels, "confidence": confidence.float(),
        "correct": (predicted == labels).to(torch.uint8),
        "entropy": _entropy(probs).float(), **{k: v.float() for k, v in extra.items()},
    }, {"data_tasks": problem.tasks, "task_names": bank.task_names, "block_names": bank.block_names})
    with atomic_write(out / "components.csv") as handle:
        post.component_summary(summary).to_csv(handle)
    _save_fit(ctx, problem, guide, fit, {"method": ctx.name, "guide": ctx.cfg.guide.kind, "gating": gating,
                                         "prior": dict(prior)})
    details = {**_fit_details(fit), "gating": gating, "prior": dict(prior)}
    return Outcome(scores, fit.seconds, eval_seconds, CoefficientStats().add(summary["coef"]), details)


def vtvc(ctx: Context, problem: Problem) -> Outcome:
    """VTVC: the configured prior (spike-and-slab by default) with the configured gating (gated)."""
    return _vtvc(ctx, problem, ctx.cfg.prior, ctx.cfg.guide.gating)


def vtvc_stochastic(ctx: Context, problem: Problem) -> Outcome:
    """The ablation without gating: relaxed gate draws during training."""
    return _vtvc(ctx, problem, ctx.cfg.prior, UNGATED)


def vtvc_gaussian(ctx: Context, problem: Problem) -> Outcome:
    """The ablation without a spike: a Normal prior on the coefficients."""
    return _vtvc(ctx, problem, gaussian_prior(ctx.cfg.prior), ctx.cfg.guide.gating)


def vtvc_merged(ctx: Context, problem: Problem) -> Outcome:
    """VTVC's mean coefficients over each task's val samples, merged into one plain encoder per task."""
    path = ctx.artifact_dir(problem, "vtvc") / "task_coef.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: vtvc_merged needs the fitted vtvc posterior of this run")
    task_coef = load_file(str(path))
    work = copy.deepcopy(ctx.bench.visual)
    parts, stats, merge_seconds = [], CoefficientStats(), 0.0
    start = time.perf_counter()
    for task in problem.tasks:
        stats.add(task_coef[task])
        merge_start = time.perf_counter()
        work.load_state_dict(problem.bank.merge(task_coef[task]))
        merge_seconds += time.perf_counter() - merge_start
        predict = encoder_predictor(work, problem.heads)
        parts.append(_scores(ctx, problem, predict, {task: problem.test[task]}))
    eval_seconds = time.perf_counter() - start - merge_seconds
    return Outcome(Scores.concat(parts), merge_seconds, eval_seconds, stats)


METHOD_FUNCTIONS: dict[str, Method] = {
    "zeroshot": zeroshot,
    "finetuned": finetuned,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "atlas": atlas,
    "metanet": metanet,
    "vtvc_gaussian": vtvc_gaussian,
    "vtvc_stochastic": vtvc_stochastic,
    "vtvc": vtvc,
    "vtvc_merged": vtvc_merged,
}
