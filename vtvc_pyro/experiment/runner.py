"""``vtvc run``: the whole data flow of an experiment in one place.

config → run directory → benchmark (checkpoints → task-vector bank, heads, splits) → for every method and
problem: fit (merge / SVI) → posterior → evaluate → per-method result file → comparison table, metrics.json
and plots. Finished methods are read back instead of recomputed; an interrupted SVI fit continues from its
checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from rich.console import Console
from rich.logging import RichHandler

from vtvc_pyro import distributed
from vtvc_pyro.device import resolve_device, torch_threads
from vtvc_pyro.evaluate import reliability_bins
from vtvc_pyro.experiment import negation, report
from vtvc_pyro.experiment.benchmark import check_inputs, load_benchmark
from vtvc_pyro.experiment.config import (
    ExperimentConfig,
    base_method,
    digest,
    load_config,
    to_dict,
    variant_config,
)
from vtvc_pyro.experiment.figures import draw_figures
from vtvc_pyro.experiment.methods import REGISTRY, Method
from vtvc_pyro.experiment.problem import (
    Context,
    FeatureCache,
    Outcome,
    Problem,
    Runtime,
    Stopwatch,
    make_problems,
)
from vtvc_pyro.experiment.rundir import RunDirectory
from vtvc_pyro.experiment.scoring import CoefficientStats, Scores
from vtvc_pyro.io import write_json


def run_order(cfg: ExperimentConfig) -> list[str]:
    """The methods to run: ``finetuned`` (it normalises every table), then the config's methods, each after
    the methods it needs."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...] = ()) -> None:
        if name in order:
            return
        if name in path:
            raise ValueError(f"methods: {' -> '.join((*path, name))} need each other")
        for need in REGISTRY[base_method(cfg, name)].needs:
            visit(need, (*path, name))
        order.append(name)

    for name in ("finetuned", *cfg.methods):
        visit(name)
    return order


@contextlib.contextmanager
def _logger(path: Path, console: Console, quiet: bool = False, main: bool = True
            ) -> Iterator[Callable[[str], None]]:
    """Log to the console (rich; warnings only when ``quiet``) and append to the run's log file; a
    distributed rank other than 0 (``main`` false) logs warnings to the console only."""
    logger = logging.getLogger(f"vtvc_pyro.run.{os.fspath(path)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    file_handler = logging.FileHandler(path, encoding="utf-8", delay=not main)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    terminal = RichHandler(console=console, show_path=False, markup=False)
    terminal.setLevel(logging.WARNING if quiet or not main else logging.INFO)
    handlers = [file_handler, terminal] if main else [terminal]
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield logger.info
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


def _result(name: str, base: str, outcomes: list[tuple[Problem, Outcome, dict[str, float]]],
            cfg: ExperimentConfig) -> dict[str, Any]:
    """A method's result file: per-task test metrics (of a negation problem, its target's), per-problem test
    metrics, coefficient statistics, seconds per phase (and any seconds spent outside the phases,
    ``untimed_seconds``), reliability bins."""
    scores = Scores.concat([o.scores for _, o, _ in outcomes])
    tasks = {t: m for p, o, _ in outcomes for t, m in o.scores.tasks.items() if p.forget in (None, t)}
    merged = CoefficientStats()
    for _, o, _ in outcomes:
        if o.coef is not None:
            merged.merge(o.coef)
    seconds = {k: sum(s[k] for _, _, s in outcomes) for k in ("fit", "eval", "save", "untimed")}
    return {
        "method": name,
        "runs": base,
        "tasks": {t: m.to_dict() for t, m in tasks.items()},
        "problems": {p.name: {t: m.to_dict() for t, m in o.scores.tasks.items()} for p, o, _ in outcomes},
        **merged.summary(),
        **{f"{k}_seconds": v for k, v in seconds.items()},
        "reliability": reliability_bins(scores.confidence, scores.correct, cfg.eval.ece_bins),
        "details": {p.name: o.details for p, o, _ in outcomes},
    }


def _seeds_result(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """One result for a method fitted with several seeds: the first seed's file, with per-task metrics,
    sparsity and active task vectors averaged over seeds, seconds summed, and every seed's own numbers under
    ``seeds``."""
    if len(results) == 1:
        return results[0][1]
    first = dict(results[0][1])
    each = [r for _, r in results]
    first["tasks"] = {
        task: {key: value if key == "n" else sum(r["tasks"][task][key] for r in each) / len(each)
               for key, value in metrics.items()}
        for task, metrics in first["tasks"].items()}
    for key in ("sparsity", "active_per_block"):
        if first.get(key) is not None:
            first[key] = sum(r[key] for r in each) / len(each)
    for key in [k for k in first if k.endswith("_seconds")]:
        first[key] = sum(r[key] for r in each)
    first["seeds"] = {str(seed): {k: r.get(k) for k in ("tasks", "sparsity", "active_per_block", "details")}
                      for seed, r in results}
    return first


def _solve(ctx: Context, method: Method, problem: Problem) -> tuple[Outcome, dict[str, float]]:
    """``method`` on ``problem`` with a fresh timer; its seconds per phase, and the untimed rest."""
    ctx.timer = Stopwatch()
    start = time.perf_counter()
    outcome = method.solve(ctx, problem)
    total = time.perf_counter() - start
    seconds = dict(ctx.timer.seconds)
    seconds["untimed"] = max(0.0, total - sum(seconds.values()))
    return outcome, seconds


def run_experiment(config_path: str | os.PathLike, overrides: Sequence[str] = (),
                   out: str | os.PathLike | None = None, force: bool = False, *, progress: bool = True,
                   quiet: bool = False, report_to: Sequence[str] = (), console: Console | None = None
                   ) -> Path:
    """Run (or resume) the experiment of a YAML config; returns the run directory.

    ``overrides``: ``--key.sub=value`` strings; ``out``: the run directory (default ``runs/<config stem>``);
    ``force``: delete a previous run there and start over; ``progress``: progress bars; ``quiet``: no log
    lines on the console (``run.log`` still has them); ``report_to``: live step loggers of the fits
    (``"tensorboard"``: ``<run>/tensorboard/``). Every config value is validated before the run directory is
    touched.
    """
    console = console or Console()
    cfg = load_config(config_path, overrides)
    check_inputs(cfg)
    runtime = _runtime(cfg)
    main = distributed.is_main()
    root = Path(out) if out is not None else Path("runs") / Path(config_path).stem
    invocation = {"argv": list(sys.argv), "config": os.fspath(config_path), "overrides": list(overrides),
                  "out": os.fspath(root), "force": force, "device": str(runtime.device),
                  "processes": distributed.world_size()}
    run = RunDirectory.open(root, to_dict(cfg), digest(cfg), invocation, force) if main else None
    distributed.barrier()
    if run is None:  # another rank reads the run directory; its writes are discarded (vtvc_pyro.io)
        run = RunDirectory(root)
    with run, _logger(run.log_path, console, quiet, main) as log, torch_threads(cfg.threads):
        log(f"run '{cfg.name}' in {run.root} (config digest {digest(cfg)[:12]})")
        bench = load_benchmark(cfg, log).place(runtime.device, cfg.bank_dtype, rank=cfg.bank_rank,
                                               energy=cfg.bank_energy)
        log(f"computing on {runtime.device} in {cfg.precision}" + (
            f", {distributed.world_size()} processes" if distributed.active() else ""))
        log(f"benchmark: {bench.description} from {bench.source}; tasks {bench.task_names}")
        run.bind_inputs(bench.fingerprint())
        features = FeatureCache(bench.visual, cfg.eval.batch_size, runtime)
        results: dict[str, dict[str, Any]] = {}
        products: dict[str, dict[str, Any]] = {}
        order = run_order(cfg)
        needed = {n for m in order for n in REGISTRY[base_method(cfg, m)].needs}
        for i, name in enumerate(order, 1):
            tag = f"[{i}/{len(order)}] {name}"
            base = base_method(cfg, name)
            method = REGISTRY[base]
            settings = variant_config(cfg, name)
            seeds = settings.fit_seeds if method.seeded else (settings.seed,)

            def context(k: int) -> Context:  # the method's context for its k-th seed
                seeded = settings.model_copy(update={"seed": seeds[k]})  # noqa: B023 (used in this iteration)
                return Context(name, seeded, bench, run, features, log, products=products,  # noqa: B023
                               progress=progress, runtime=runtime, report_to=tuple(report_to),
                               seed_dir=f"seed-{seeds[k]}" if k else "")  # noqa: B023

            if distributed.broadcast_object(run.is_done(name)):  # rank 0 decides for all
                results[name] = run.load_result(name)
                if name in needed:
                    for k in range(len(seeds)):
                        ctx = context(k)
                        products[ctx.product_key(name)] = {p.name: method.restore(ctx, p, results[name])
                                                           for p in make_problems(settings, bench)}
                log(f"{tag}: finished in an earlier invocation; kept")
                continue
            run.mark_started(name)
            log(f"{tag}: running" + (f" (variant of {base})" if base != name else ""))
            per_seed = []
            try:
                for k, seed in enumerate(seeds):
                    ctx = context(k)
                    if len(seeds) > 1:
                        log(f"{tag}: seed {seed} ({k + 1}/{len(seeds)})")
                    outcomes = []
                    for problem in make_problems(settings, bench):
                        pyro.set_rng_seed(seed)
                        outcomes.append((problem, *_solve(ctx, method, problem)))
                    per_seed.append((seed, outcomes))
                    products[ctx.product_key(name)] = {p.name: o.product for p, o, _ in outcomes}
            except ValueError as err:
                done = [m for m in order if m in results]
                log(f"{tag}: stopped on an invalid value: {err}. The {len(done)} finished methods "
                    f"({', '.join(done) or 'none'}) stay in {run.root / 'methods'}; a corrected config is a "
                    "new run: give it another --out to keep this one")
                raise
            except BaseException:
                log(f"{tag}: interrupted; run the same command again to resume")
                raise
            results[name] = _seeds_result([(seed, _result(name, base, o, settings)) for seed, o in per_seed])
            run.save_result(name, results[name])
            result = results[name]
            accuracy = [m["accuracy"] for m in result["tasks"].values()]
            saving = f", saving {result['save_seconds']:.1f} s" if result["save_seconds"] else ""
            log(f"{tag}: mean test accuracy {100 * sum(accuracy) / len(accuracy):.1f}% "
                f"(fit {result['fit_seconds']:.1f} s, eval {result['eval_seconds']:.1f} s{saving})")

        if main:  # the other ranks' writes are discarded: they have no metrics.json to draw from
            _tables(run, cfg, results, bench.description, bench.source)
            plots = draw_figures(run)
            run.mark_complete()
            log(f"wrote {run.root / 'metrics.json'}, {run.root / 'table.md'} and {len(plots)} plots")
    if main:
        console.print((run.root / "table.md").read_text(), markup=False, highlight=False, soft_wrap=True)
        console.print(f"run directory: {run.root}\nplots: {run.plots_dir}", markup=False, soft_wrap=True)
    return run.root


def _runtime(cfg: ExperimentConfig) -> Runtime:
    """The device (under torchrun: this process's GPU, after joining the process group), precision and
    DataLoader settings of a run."""
    device = resolve_device(cfg.device)
    if distributed.init_from_env(device) and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return Runtime(device, cfg.precision, cfg.loader.loader_config())


def _tables(run: RunDirectory, cfg: ExperimentConfig, results: dict[str, dict[str, Any]], description: str,
            source: str) -> None:
    """``table.md``, ``table.csv`` and ``metrics.json`` of the finished methods (negation: per-target
    tables of target and control accuracy)."""
    tasks = list(results["finetuned"]["tasks"])
    finetuned_accuracy = {t: m["accuracy"] for t, m in results["finetuned"]["tasks"].items()}
    rows = report.summarize({m: results[m] for m in cfg.methods}, tasks, finetuned_accuracy)
    title = f"{cfg.name}: {cfg.protocol.name.replace('_', ' ')}, {description}"
    extra = {}
    if cfg.protocol.name == "negation":
        extra["negation"] = negation.write_tables(results, cfg.methods, run.root / "table.md",
                                                  run.root / "table.csv", title)
    else:
        report.write_tables(rows, tasks, run.root / "table.md", run.root / "table.csv", title)
    write_json(run.root / "metrics.json", {
        "name": cfg.name,
        "config_digest": digest(cfg),
        "protocol": cfg.protocol.name,
        "benchmark": description,
        "benchmark_source": source,
        "title": title,
        "tasks": tasks,
        "finetuned_accuracy": finetuned_accuracy,
        "methods": {m: {**rows[m], "runs": results[m]["runs"], "details": results[m]["details"],
                        **({"per_seed": results[m]["seeds"]} if "seeds" in results[m] else {})}
                    for m in cfg.methods},
        **extra,
    })
