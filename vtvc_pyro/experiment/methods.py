"""The compared methods (METHOD §8) as registered :class:`Method` objects, ``solve(ctx, problem) -> Outcome``
on the problem's bank, heads and splits. A method that others build on hands them an in-memory product (the
fine-tuned reference, vtvc's per-task coefficients) through ``Outcome.product``; ``needs`` declares who uses
whose, and ``restore`` rebuilds a product from the producer's own files when it finished in an earlier
invocation. Every piece of work runs inside ``ctx.timer("fit" | "eval" | "save")``.

Merged weights are scored as a plain open_clip tower; sample-specific coefficients through the composed
encoder. The VTVC family writes ``posterior.nc`` (ArviZ) for its test samples.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Subset

from vtvc_pyro import distributed
from vtvc_pyro.baselines import ATLASModel, MetaNetModel, empty_guide
from vtvc_pyro.evaluate import TaskMetrics, select_alpha
from vtvc_pyro.experiment.config import ExperimentConfig
from vtvc_pyro.experiment.negation import forgetting, inclusion_by_input, negated_task_arithmetic
from vtvc_pyro.experiment.problem import Context, Outcome, Problem
from vtvc_pyro.experiment.scoring import (
    CoefficientStats,
    Scores,
    encoder_predictor,
    predict_dataset,
    scores_from_probs,
)
from vtvc_pyro.guide import GATINGS, GateSlabGuide, build_guide
from vtvc_pyro.inference import (
    PER_DATUM,
    STEP_FIELDS,
    CheckpointError,
    FitResult,
    fit_svi,
    save_fitted,
)
from vtvc_pyro.io import atomic_path, atomic_write
from vtvc_pyro.merge import task_arithmetic as task_arithmetic_merge
from vtvc_pyro.merge import ties_merging
from vtvc_pyro.model import Encoder, VTVCModel
from vtvc_pyro.parallel import fork_map
from vtvc_pyro.posterior import Posterior, coefficient_predictor
from vtvc_pyro.priors import PriorSpec

UNGATED = GATINGS[1]
"""The guide's gating mode with sampled gates (``vtvc_stochastic``, the ablation without gating)."""

POSTERIOR_FILE = "posterior.nc"


@dataclass(frozen=True)
class Method:
    """A compared method. ``needs``: methods whose products ``solve`` reads (``ctx.product``); ``restore(ctx,
    problem, result)``: this method's product rebuilt from its result and files; ``posterior``: writes
    ``posterior.nc``."""

    name: str
    solve: Callable[[Context, Problem], Outcome]
    needs: tuple[str, ...] = ()
    restore: Callable[[Context, Problem, Mapping[str, Any]], Any] | None = None
    posterior: bool = False
    seeded: bool = False


REGISTRY: dict[str, Method] = {}


def register(name: str, *, needs: tuple[str, ...] = (), restore: Callable | None = None,
             posterior: bool = False, seeded: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register ``solve`` as the method ``name`` (``seeded``: a learned method, fitted once per
    seed of ``seeds``)."""

    def add(solve: Callable[[Context, Problem], Outcome]) -> Callable[[Context, Problem], Outcome]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        REGISTRY[name] = Method(name, solve, needs, restore, posterior, seeded)
        return solve

    return add


# ---------------------------------------------------------------- shared steps


def _fit(ctx: Context, problem: Problem, model: torch.nn.Module, guide: Callable, *, bayesian: bool,
         positions: list[int] | None = None, kl_weight: float | None = None) -> FitResult:
    """SVI on the problem's fit data (or the samples at ``positions``), continuing from the method's
    checkpoint if a previous run left one; an unreadable checkpoint is reported and the fit restarts from
    scratch. The deterministic baselines use the ``baselines`` steps, lr and batch size and the plain ELBO
    (no latents). A negation problem fits with the forgetting likelihood."""
    config = ctx.cfg.svi_config(progress=ctx.progress, device=ctx.runtime.device)
    if problem.forget is not None:
        model = forgetting(model, problem)
    if not bayesian:
        b = ctx.cfg.baselines
        config = dataclasses.replace(config, steps=b.steps, lr=b.lr, batch_size=b.batch_size, elbo="trace",
                                     num_particles=1, kl_weight=1.0, kl_anneal_steps=0)
    elif kl_weight is not None:
        config = dataclasses.replace(config, kl_weight=kl_weight)
    data, features = problem.joined("fit"), ctx.features(problem, "fit")
    if positions is not None:
        data, features = Subset(data, positions), features[positions]
    depends_on = {"kl_weight": config.kl_weight, "positions": positions}  # each held-out split its own
    path = ctx.checkpoint_path(problem, depends_on)
    with ctx.step_logger(problem) as callback:
        try:
            fit = fit_svi(model, guide, data, config, features0=features, checkpoint_path=path,
                          loader=ctx.runtime.loader, callback=callback)
        except CheckpointError as err:
            moved = ctx.discard_checkpoint(problem, depends_on)
            ctx.log(f"{ctx.name}/{problem.name}: {err}; moved to {moved}; refitting from scratch")
            fit = fit_svi(model, guide, data, config, features0=features, checkpoint_path=path, resume=False,
                          loader=ctx.runtime.loader, callback=callback)
    if fit.start_step:
        ctx.log(f"{ctx.name}/{problem.name}: resumed SVI from its checkpoint at step {fit.start_step}")
    return fit


def _fit_details(fit: FitResult) -> dict[str, Any]:
    """The fit's length and its last step's objective, per datum, each named for what it is."""
    last = fit.history[-1]
    return {"steps": fit.steps, "resumed_from_step": fit.start_step,
            "final": {name: getattr(last, name) for name in ("kl_scale", *PER_DATUM)}}


def save_tensors(path: Any, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
                 ) -> None:
    """Tensors as safetensors (atomically), metadata values JSON-encoded."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def _save_fit(ctx: Context, problem: Problem, module: torch.nn.Module, fit: FitResult,
              metadata: Mapping[str, Any]) -> None:
    """``fitted.safetensors`` (the module's parameters and buffers) and ``elbo.csv`` (one row per step: KL
    weight, learning rate, the tempered objective, the ELBO at KL weight 1 and its two parts, per datum)."""
    out = ctx.artifact_dir(problem)
    meta = {"task_names": problem.bank.task_names, "block_names": problem.bank.block_names, **metadata}
    save_fitted(module, out / "fitted.safetensors", {k: json.dumps(v) for k, v in meta.items()})
    with atomic_write(out / "elbo.csv", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(STEP_FIELDS)
        writer.writerows(dataclasses.astuple(record) for record in fit.history)


def _merged_scores(ctx: Context, problem: Problem, merge: Callable[[float], dict]) -> Outcome:
    """Choose α on val by mean normalised accuracy, then score the merged tower on test once. Tasks whose
    fine-tuned model scores 0 on val cannot be normalised and are left out of the choice (with a note)."""
    reference: FinetunedReference = ctx.product("finetuned", problem)
    usable = [t for t in problem.tasks if reference.val_accuracy[t] > 0]
    if not usable:
        raise ValueError(f"{problem.name}: every fine-tuned model scores 0 on its val split; α cannot be "
                         "chosen by normalised accuracy (protocol.max_fit_per_task too small?)")
    if len(usable) < len(problem.tasks):
        ctx.log(f"{ctx.name}: fine-tuned val accuracy is 0 for {sorted(set(problem.tasks) - set(usable))}; "
                "α is chosen on the other tasks")
    grid = ctx.cfg.protocol.alpha_grid
    with ctx.timer("fit"), ctx.progress_bar(len(grid), "α grid on val") as bar:
        work = copy.deepcopy(ctx.bench.visual)

        def at(alpha: float) -> dict[str, TaskMetrics]:
            work.load_state_dict(merge(alpha))
            bar.update(1)
            return ctx.val_metrics(problem, work, usable)

        chosen = select_alpha(at, {t: reference.val_accuracy[t] for t in usable}, grid)
        work.load_state_dict(merge(chosen.alpha))
    with ctx.timer("eval"):
        scores = ctx.test_scores(problem, encoder_predictor(ctx.runtime.plain(work), problem.heads))
    details = {"alpha": chosen.alpha, "val_score": chosen.score,
               "val_scores": {f"{a:g}": s for a, s in chosen.scores.items()}}
    return Outcome(scores, details=details)


# ---------------------------------------------------------------- references and classic merges


@register("zeroshot")
def zeroshot(ctx: Context, problem: Problem) -> Outcome:
    """The pre-trained encoder θ0."""
    with ctx.timer("eval"):
        predict = encoder_predictor(ctx.runtime.plain(ctx.bench.visual), problem.heads)
        return Outcome(ctx.test_scores(problem, predict))


@dataclass(frozen=True)
class FinetunedReference:
    """The fine-tuned models' val accuracy per task: the normaliser for α selection."""

    val_accuracy: dict[str, float]


def _restore_reference(ctx: Context, problem: Problem, result: Mapping[str, Any]) -> FinetunedReference:
    return FinetunedReference(dict(result["details"][problem.name]["val_accuracy"]))


@register("finetuned", restore=_restore_reference)
def finetuned(ctx: Context, problem: Problem) -> Outcome:
    """Each task's own fine-tuned encoder θ_t: the upper bound that normalises accuracy (val and test)."""
    parts, val_accuracy = [], {}
    with ctx.timer("eval"):
        work = copy.deepcopy(ctx.bench.visual)
        for task in problem.tasks:
            work.load_state_dict(ctx.bench.finetuned_state_dict(task))
            val_accuracy[task] = ctx.val_metrics(problem, work, [task])[task].accuracy
            predict = encoder_predictor(ctx.runtime.plain(work), problem.heads)
            parts.append(ctx.test_scores(problem, predict, {task: problem.test[task]}))
    return Outcome(Scores.concat(parts), details={"val_accuracy": val_accuracy},
                   product=FinetunedReference(val_accuracy))


@register("task_arithmetic", needs=("finetuned",))
def task_arithmetic(ctx: Context, problem: Problem) -> Outcome:
    """θ0 + α Σ_t τ_t, α chosen on val; for negation θ0 − α τ_target, α keeping the control accuracy."""
    if problem.forget is not None:
        return negated_task_arithmetic(ctx, problem)
    bank = problem.bank
    outcome = _merged_scores(ctx, problem, lambda alpha: task_arithmetic_merge(bank, alpha))
    alpha = outcome.details["alpha"]
    outcome.coef = CoefficientStats().add(torch.full((bank.num_tasks, bank.num_blocks), alpha))
    return outcome


@register("ties", needs=("finetuned",))
def ties(ctx: Context, problem: Problem) -> Outcome:
    """TIES-merging (top-k trim, sign election, disjoint mean), scaled by α chosen on val."""
    bank = problem.bank
    with ctx.timer("fit"):
        base = bank.pretrained_state_dict()
        full = ties_merging(bank, top_k=ctx.cfg.protocol.ties_top_k, alpha=1.0)  # θ0 + merged τ

    def merge(alpha: float) -> dict[str, torch.Tensor]:
        return {k: base[k] + alpha * (full[k] - base[k]) if base[k].is_floating_point() else base[k]
                for k in base}

    return _merged_scores(ctx, problem, merge)


# ---------------------------------------------------------------- learned coefficients


def baseline_model(base: str, cfg: ExperimentConfig, encoder: Encoder, problem: Problem,
                   feature_dim: int | None = None) -> ATLASModel | MetaNetModel:
    """An unfitted aTLAS (``base="atlas"``) or meta-network (``"metanet"``) on the problem's bank and heads,
    set up as ``cfg`` says; ``feature_dim``: the pre-trained features' width (the meta-network's input)."""
    bank = problem.bank
    if base == "atlas":
        return ATLASModel(encoder, problem.heads, bank.task_names, bank.block_names)
    if base != "metanet" or feature_dim is None:
        raise ValueError(f"{base!r}: a deterministic baseline is atlas, or metanet with its feature_dim")
    return MetaNetModel(encoder, problem.heads, feature_dim, bank.task_names, bank.block_names,
                        hidden_dim=cfg.guide.hidden_dim, init_coef=cfg.guide.init_loc)


def _learned(ctx: Context, problem: Problem, model: ATLASModel | MetaNetModel) -> Outcome:
    """A deterministic baseline fitted by cross-entropy (SVI with an empty guide) and scored on test."""
    with ctx.timer("fit"):
        fit = _fit(ctx, problem, model, empty_guide, bayesian=False)
    with ctx.timer("eval"):
        scores = ctx.test_scores(problem, coefficient_predictor(model.frozen, model.point_coef))
        test_features = ctx.features(problem, "test").to(ctx.runtime.device)
        stats = CoefficientStats().add(model.point_coef(test_features))
    with ctx.timer("save"):
        _save_fit(ctx, problem, model, fit, {"method": ctx.name})
    return Outcome(scores, stats, _fit_details(fit))


@register("atlas", seeded=True)
def atlas(ctx: Context, problem: Problem) -> Outcome:
    """aTLAS: task-level λ ∈ R^{T×B}, initialised at 0, learned by cross-entropy on the fit data."""
    with ctx.timer("fit"):
        encoder = ctx.runtime.composed(ctx.bench.visual, problem.bank)
        model = baseline_model("atlas", ctx.cfg, encoder, problem)
    return _learned(ctx, problem, model)


@register("metanet", seeded=True)
def metanet(ctx: Context, problem: Problem) -> Outcome:
    """The deterministic meta-network: the guide's g_φ outputs λ_n directly, cross-entropy only."""
    with ctx.timer("fit"):
        model = baseline_model("metanet", ctx.cfg, ctx.runtime.composed(ctx.bench.visual, problem.bank),
                               problem, ctx.features(problem, "fit").shape[1])
    return _learned(ctx, problem, model)


# ---------------------------------------------------------------- VTVC


def _posterior_subset(ctx: Context, problem: Problem) -> tuple[Subset, torch.Tensor]:
    """The first ``eval.posterior_per_task`` test samples of every task, and their pre-trained features."""
    test = problem.joined("test")
    keep = torch.cat([torch.nonzero(test.task_ids == k)[: ctx.cfg.eval.posterior_per_task, 0]
                      for k in test.task_ids.unique(sorted=True).tolist()])
    return Subset(test, keep.tolist()), ctx.features(problem, "test")[keep]


def _task_coef_path(ctx: Context, problem: Problem) -> Any:
    return ctx.artifact_dir(problem, "vtvc") / "task_coef.safetensors"


def heldout_split(problem: Problem, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions in the problem's fit data kept for fitting and held out: per task, a seeded ``share`` of its
    samples (at least one) is held out."""
    task = problem.joined("fit").task_ids
    generator = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for k in range(len(problem.tasks)):
        positions = torch.nonzero(task == k)[:, 0]
        positions = positions[torch.randperm(len(positions), generator=generator)]
        count = max(1, round(share * len(positions)))
        held += positions[:count].tolist()
        keep += positions[count:].tolist()
    return sorted(keep), sorted(held)


def vtvc_parts(cfg: ExperimentConfig, encoder: Encoder, problem: Problem, prior: PriorSpec,
               gating: str | None, feature_dim: int) -> tuple[VTVCModel, GateSlabGuide]:
    """An unfitted VTVC model and guide on the problem's bank and heads (``cfg.guide``'s settings;
    ``gating`` overrides its mode)."""
    bank = problem.bank
    model = VTVCModel(encoder, problem.heads, prior, bank.task_names, bank.block_names)
    guide = build_guide(cfg.guide, feature_dim, bank.task_names, bank.block_names, prior, gating=gating)
    return model, guide


def _vtvc_parts(ctx: Context, problem: Problem, prior: PriorSpec, gating: str | None
                ) -> tuple[VTVCModel, GateSlabGuide]:
    """A fresh model and guide (the guide initialised from the run's seed)."""
    torch.manual_seed(ctx.cfg.seed)
    return vtvc_parts(ctx.cfg, ctx.runtime.composed(ctx.bench.visual, problem.bank), problem, prior, gating,
                      ctx.features(problem, "fit").shape[1])


def _select_kl_weight(ctx: Context, problem: Problem, prior: PriorSpec, gating: str | None
                      ) -> tuple[float, dict[str, Any]]:
    """``selection.kl_weights``' best candidate on held-out parts of the fit data (see
    :class:`~vtvc_pyro.experiment.config.SelectionSettings`), and every candidate's held-out scores: their
    means over the ``repeats`` splits, and each split's under ``per_split``. The candidate fits run in up to
    ``workers`` processes on CPU (each fit seeds itself: the same scores in any order)."""
    settings = ctx.cfg.selection
    reference: FinetunedReference = ctx.product("finetuned", problem)
    fit_data = problem.joined("fit")
    splits = {seed: heldout_split(problem, settings.heldout, seed)
              for seed in range(settings.split_seed, settings.split_seed + settings.repeats)}
    workers = ctx.cfg.workers
    if workers > 1 and (ctx.runtime.device.type != "cpu" or distributed.active()):
        ctx.log(f"{ctx.name}/{problem.name}: workers: {workers} fits side by side need a single CPU process; "
                "fitting the candidates one after the other")
        workers = 1
    fit_ctx = dataclasses.replace(ctx, progress=False) if workers > 1 else ctx  # no bars racing each other

    def heldout_score(job: tuple[int, float]) -> dict[str, float]:
        split_seed, weight = job
        keep, held = splits[split_seed]
        heldout, task_ids = Subset(fit_data, held), fit_data.task_ids[held]
        model, guide = _vtvc_parts(ctx, problem, prior, gating)
        _fit(fit_ctx, problem, model, guide, bayesian=True, positions=keep, kl_weight=weight)
        predict = Posterior(model, guide, batch_size=ctx.cfg.eval.batch_size, device=ctx.runtime.device,
                            loader=ctx.runtime.loader).predict
        probs, labels, _ = predict_dataset(predict, heldout, ctx.cfg.eval.batch_size,
                                           device=ctx.runtime.device, loader=ctx.runtime.loader)
        metrics = scores_from_probs(probs, labels, task_ids, problem.heads, ctx.cfg.eval.ece_bins).tasks
        normalized = [metrics[t].accuracy / reference.val_accuracy[t] for t in problem.tasks
                      if reference.val_accuracy[t] > 0]
        score = {"mean_normalized_accuracy": sum(normalized) / len(normalized),
                 "mean_accuracy": sum(m.accuracy for m in metrics.values()) / len(metrics),
                 "nll": sum(m.nll for m in metrics.values()) / len(metrics)}
        ctx.log(f"{ctx.name}/{problem.name}: kl_weight {weight:g}, split {split_seed}: held-out mean "
                f"normalised accuracy {100 * score['mean_normalized_accuracy']:.1f}%")
        return score

    jobs = [(split_seed, weight) for split_seed in splits for weight in settings.kl_weights]
    per_split: dict[str, list[dict[str, float]]] = {f"{w:g}": [] for w in settings.kl_weights}
    for (_, weight), score in zip(jobs, fork_map(heldout_score, jobs, workers), strict=True):
        per_split[f"{weight:g}"].append(score)
    scores = {w: {**{k: sum(s[k] for s in runs) / len(runs) for k in runs[0]}, "per_split": runs}
              for w, runs in per_split.items()}
    best = max(settings.kl_weights, key=lambda w: (scores[f"{w:g}"]["mean_normalized_accuracy"],
                                                   -scores[f"{w:g}"]["nll"]))
    held = splits[settings.split_seed][1]
    return best, {"kl_weight": best, "heldout": settings.heldout, "split_seed": settings.split_seed,
                  "repeats": settings.repeats, "heldout_samples": len(held), "scores": scores}


def _vtvc(ctx: Context, problem: Problem, prior: PriorSpec, gating: str | None) -> Outcome:
    """Fit the VTVC guide by SVI (``kl_weight`` chosen on held-out fit data when ``selection.kl_weights`` is
    set), score its gated (or Monte Carlo) prediction, save the posterior."""
    bank = problem.bank
    with ctx.timer("fit"):
        kl_weight, selection = None, None
        if ctx.cfg.selection.kl_weights:
            kl_weight, selection = _select_kl_weight(ctx, problem, prior, gating)
        model, guide = _vtvc_parts(ctx, problem, prior, gating)
        fit = _fit(ctx, problem, model, guide, bayesian=True, kl_weight=kl_weight)

    with ctx.timer("eval"):
        post = Posterior(model, guide, batch_size=ctx.cfg.eval.batch_size, device=ctx.runtime.device,
                         loader=ctx.runtime.loader)
        test, test_features = problem.joined("test"), ctx.features(problem, "test")
        samples = ctx.cfg.eval.mc_samples
        if samples:
            pred = post.predictive(test, samples, test_features)
            probs, labels, task = pred["probs"].double(), pred["labels"], pred["task"]
        else:
            probs, labels, task = predict_dataset(post.predict, test, ctx.cfg.eval.batch_size,
                                                  device=ctx.runtime.device, loader=ctx.runtime.loader)
        scores = scores_from_probs(probs, labels, task, problem.heads, ctx.cfg.eval.ece_bins)
        summary = post.summarize(test, test_features)
        stats = CoefficientStats().add(summary["coef"])

    with ctx.timer("save"):
        out = ctx.artifact_dir(problem)
        val_summary = post.summarize(problem.joined("val"), ctx.features(problem, "val"))
        task_coef = post.task_coefficients(val_summary)
        save_tensors(out / "task_coef.safetensors", task_coef, {"block_names": bank.block_names,
                                                               "task_names": bank.task_names})
        subset, subset_features = _posterior_subset(ctx, problem)
        idata = post.to_inference_data(subset, ctx.cfg.eval.posterior_draws, subset_features)
        with atomic_path(out / POSTERIOR_FILE) as tmp:
            idata.to_netcdf(str(tmp))
        _save_fit(ctx, problem, guide, fit, {"method": ctx.name, "guide": ctx.cfg.guide.kind,
                                             "gating": guide.gating, "prior": prior.to_mapping()})
    details = {**_fit_details(fit), "gating": guide.gating, "prior": prior.to_mapping(),
               "kl_weight": ctx.cfg.svi.kl_weight if kl_weight is None else kl_weight}
    if selection is not None:
        details["selection"] = selection
    if problem.forget is not None:
        details["inclusion"] = inclusion_by_input(summary, problem)
    return Outcome(scores, stats, details, product=task_coef)


def _restore_task_coef(ctx: Context, problem: Problem, result: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    path = _task_coef_path(ctx, problem)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; vtvc finished in an earlier run but its per-task "
                                "coefficients are gone; rerun with --force")
    return load_file(str(path))


@register("vtvc", needs=("finetuned",), restore=_restore_task_coef, posterior=True, seeded=True)
def vtvc(ctx: Context, problem: Problem) -> Outcome:
    """VTVC: the configured prior (spike-and-slab by default) with the configured gating."""
    return _vtvc(ctx, problem, ctx.cfg.prior, None)


@register("vtvc_stochastic", needs=("finetuned",), posterior=True, seeded=True)
def vtvc_stochastic(ctx: Context, problem: Problem) -> Outcome:
    """The ablation without gating: gates sampled from the guide."""
    return _vtvc(ctx, problem, ctx.cfg.prior, UNGATED)


@register("vtvc_gaussian", needs=("finetuned",), posterior=True, seeded=True)
def vtvc_gaussian(ctx: Context, problem: Problem) -> Outcome:
    """The ablation without a spike: a Normal prior on the coefficients."""
    return _vtvc(ctx, problem, ctx.cfg.prior.without_spike(), None)


@register("vtvc_merged", needs=("vtvc",), seeded=True)
def vtvc_merged(ctx: Context, problem: Problem) -> Outcome:
    """VTVC's mean coefficients over each task's val samples, merged into one plain encoder per task."""
    task_coef: dict[str, torch.Tensor] = ctx.product("vtvc", problem)
    parts, stats = [], CoefficientStats()
    with ctx.timer("fit"):
        work = copy.deepcopy(ctx.bench.visual)
    for task in problem.tasks:
        stats.add(task_coef[task])
        with ctx.timer("fit"):
            work.load_state_dict(problem.bank.merge(task_coef[task]))
        with ctx.timer("eval"):
            predict = encoder_predictor(ctx.runtime.plain(work), problem.heads)
            parts.append(ctx.test_scores(problem, predict, {task: problem.test[task]}))
    return Outcome(Scores.concat(parts), stats)
