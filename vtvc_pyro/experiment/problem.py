"""One composition problem of a protocol, and what a method sees while solving it.

Task addition is one problem (compose all T task vectors, fit on the union of val splits, score every
task's test split with its own head). Knowledge transfer is one problem per target task (compose the other
tasks' vectors, fit on the target's train split, score its test split). Negation is one problem per target
task (the target's vector only, fit on the val splits of the target and of the other tasks, its controls;
score every task's test split).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vtvc_pyro import distributed
from vtvc_pyro.compose import ComposedEncoder
from vtvc_pyro.data import LoaderConfig, MultiTaskDataset
from vtvc_pyro.device import AutocastEncoder, compute_dtype
from vtvc_pyro.evaluate import Predict, TaskMetrics, evaluate_encoder
from vtvc_pyro.experiment.benchmark import Benchmark
from vtvc_pyro.experiment.config import ExperimentConfig
from vtvc_pyro.experiment.rundir import RunDirectory
from vtvc_pyro.experiment.scoring import CoefficientStats, Scores, predict_dataset, scores_from_probs
from vtvc_pyro.experiment.tracking import tensorboard_steps
from vtvc_pyro.heads import HeadBank
from vtvc_pyro.inference import pretrained_features
from vtvc_pyro.model import Encoder
from vtvc_pyro.task_vectors import TaskVectorBank


@dataclass
class Problem:
    """The bank to compose, the tasks scored (``heads`` order), and their fit / val / test data. ``forget``
    (negation): the target task whose samples the learned methods are asked to forget (METHOD §8)."""

    name: str
    tasks: list[str]
    bank: TaskVectorBank
    heads: HeadBank
    fit: dict[str, Dataset]
    val: dict[str, Dataset]
    test: dict[str, Dataset]
    forget: str | None = None
    _joined: dict[str, MultiTaskDataset] = field(default_factory=dict, repr=False)

    def joined(self, split: str) -> MultiTaskDataset:
        """``fit``, ``val`` or ``test`` of all tasks as one dataset of ``(index, image, label, task_id)``."""
        if split not in self._joined:
            self._joined[split] = MultiTaskDataset(getattr(self, split), self.tasks)
        return self._joined[split]


def make_problems(cfg: ExperimentConfig, bench: Benchmark) -> list[Problem]:
    """The problems of ``cfg.protocol`` on the bank with ``cfg.blocks``."""
    bank = bench.bank(cfg.blocks)
    splits = bench.splits
    if cfg.protocol.name == "task_addition":
        tasks = list(bench.task_names)
        return [Problem("all", tasks, bank, bench.heads, dict(splits["val"]), dict(splits["val"]),
                        dict(splits["test"]))]
    targets = list(cfg.protocol.targets or bench.task_names)
    unknown = [t for t in targets if t not in bench.task_names]
    if unknown:
        raise ValueError(f"protocol.targets: unknown tasks {unknown}; the benchmark has {bench.task_names}")
    if len(bench.task_names) < 2:
        raise ValueError(f"protocol.name: {cfg.protocol.name.replace('_', ' ')} needs at least two tasks")
    if cfg.protocol.name == "negation":
        return [_negation_problem(target, bank, bench) for target in targets]
    problems = []
    for target in targets:
        others = [t for t in bench.task_names if t != target]
        problems.append(Problem(
            target, [target], bank.select_tasks(others), HeadBank({target: bench.heads[target]}),
            {target: splits["train"][target]}, {target: splits["val"][target]},
            {target: splits["test"][target]},
        ))
    return problems


def _negation_problem(target: str, bank: TaskVectorBank, bench: Benchmark) -> Problem:
    """Negate ``target``: its task vector alone, fitted on the val splits of the target and the controls (the
    other tasks), every task scored with its own head."""
    tasks = [target, *(t for t in bench.task_names if t != target)]
    val = {t: bench.splits["val"][t] for t in tasks}
    return Problem(target, tasks, bank.select_tasks([target]), HeadBank({t: bench.heads[t] for t in tasks}),
                   dict(val), val, {t: bench.splits["test"][t] for t in tasks}, forget=target)


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes: the device, the precision of the ViT passes, the DataLoader settings."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    loader: LoaderConfig = LoaderConfig()

    def plain(self, visual: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``visual(images) -> features`` in the run's precision (float32 features)."""
        return AutocastEncoder(visual, self.precision, self.device)

    def composed(self, visual: nn.Module, bank: TaskVectorBank) -> Encoder:
        """The composed encoder of ``bank`` in the run's precision (float32 features)."""
        encoder = ComposedEncoder(visual, bank, dtype=compute_dtype(self.precision))
        return encoder if self.precision == "fp32" else AutocastEncoder(encoder, self.precision, self.device)


class FeatureCache:
    """``normalize(f(x; θ0))`` of a problem's split, computed once with the plain pre-trained tower (on CPU;
    distributed ranks each encode a share)."""

    def __init__(self, visual: nn.Module, batch_size: int, runtime: Runtime | None = None):
        self.runtime = runtime or Runtime()
        self.visual = self.runtime.plain(visual)
        self.batch_size = batch_size
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, problem: Problem, split: str) -> torch.Tensor:
        key = (problem.name, split)
        if key not in self._cache:
            plain = SimpleNamespace(features0=lambda images: F.normalize(self.visual(images), dim=-1))
            self._cache[key] = pretrained_features(plain, problem.joined(split), batch_size=self.batch_size,
                                                   device=self.runtime.device, loader=self.runtime.loader)
        return self._cache[key]


class Stopwatch:
    """Seconds per phase (``fit``, ``eval``, ``save``) of a method on a problem: ``with timer("fit"):``."""

    PHASES = ("fit", "eval", "save")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if phase not in self.seconds:
            raise ValueError(f"phase {phase!r}: expected one of {', '.join(self.PHASES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


@dataclass
class Outcome:
    """One method on one problem: scores, coefficient statistics, method-specific details (plain JSON data),
    and the in-memory ``product`` methods that need this one read (see ``methods.Method.needs``)."""

    scores: Scores
    coef: CoefficientStats | None = None
    details: dict[str, Any] = field(default_factory=dict)
    product: Any = None


@dataclass
class Context:
    """What a method may use: its name and effective settings, the benchmark, the run directory, the feature
    cache, a logger, the timer its work runs under, and the products of the methods it needs."""

    name: str
    cfg: ExperimentConfig
    bench: Benchmark
    run: RunDirectory
    features: FeatureCache
    log: Callable[[str], None]
    timer: Stopwatch = field(default_factory=Stopwatch)
    products: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    progress: bool = True
    runtime: Runtime = Runtime()
    seed_dir: str = ""
    """Sub-directory of the artifacts of a fit with a seed other than the run's first (``seed-<s>``)."""
    report_to: tuple[str, ...] = ()
    """Live step loggers of the fits (``"tensorboard"``), see :mod:`vtvc_pyro.experiment.tracking`."""

    def test_scores(self, problem: Problem, predict: Predict, splits: Mapping[str, Dataset] | None = None
                    ) -> Scores:
        """Scores of ``predict`` on the problem's test splits (or on ``splits``), on the run's device."""
        data = problem.joined("test") if splits is None else MultiTaskDataset(splits, problem.tasks)
        probs, labels, task = predict_dataset(predict, data, self.cfg.eval.batch_size,
                                              device=self.runtime.device, loader=self.runtime.loader)
        return scores_from_probs(probs, labels, task, problem.heads, self.cfg.eval.ece_bins)

    def val_metrics(self, problem: Problem, encoder: nn.Module, tasks: Sequence[str] | None = None
                    ) -> dict[str, TaskMetrics]:
        """Val metrics of a plain ``encoder`` (run precision and device) on ``tasks`` (default: all)."""
        splits = {t: problem.val[t] for t in (tasks or problem.tasks)}
        plain = self.runtime.plain(encoder)
        return evaluate_encoder(lambda images, _ids: plain(images), problem.heads, splits,
                                self.cfg.eval.batch_size, self.runtime.loader, self.runtime.device)

    def progress_bar(self, total: int, desc: str) -> tqdm:
        """A progress bar for a stage of this method (off without ``progress`` and on ranks other than 0)."""
        return tqdm(total=total, desc=f"{self.name}: {desc}", leave=False,
                    disable=not self.progress or not distributed.is_main())

    def step_logger(self, problem: Problem) -> contextlib.AbstractContextManager:
        """A context giving the SVI step callback of a fit on ``problem`` (``None``: no live logging)."""
        if "tensorboard" not in self.report_to:
            return contextlib.nullcontext(None)
        return tensorboard_steps(self.run.root / "tensorboard" / self.name / problem.name / self.seed_dir)

    def artifact_dir(self, problem: Problem, method: str | None = None) -> Path:
        """``posteriors/<method>/<problem>/`` (``.../seed-<s>/`` for the run's further seeds): fitted
        parameters and posterior summaries."""
        return self.run.posterior_dir(method or self.name) / problem.name / self.seed_dir

    def checkpoint_path(self, problem: Problem, depends_on: Mapping[str, Any] | None = None) -> Path:
        """The SVI checkpoint of this method on ``problem``, keyed on the fit's seed and ``depends_on``."""
        return self.run.checkpoint_path(self.name, problem.name, self._checkpoint_keys(depends_on))

    def discard_checkpoint(self, problem: Problem, depends_on: Mapping[str, Any] | None = None
                           ) -> Path | None:
        """Move that checkpoint aside (``*.damaged``); returns where it went."""
        return self.run.discard_checkpoint(self.name, problem.name, self._checkpoint_keys(depends_on))

    def _checkpoint_keys(self, depends_on: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"seed": self.cfg.seed, **(depends_on or {})}

    def product_key(self, method: str) -> str:
        """Where ``method``'s products for this context's seed are kept (``method`` for the first seed)."""
        return f"{method}/{self.seed_dir}" if self.seed_dir else method

    def product(self, method: str, problem: Problem) -> Any:
        """What ``method`` handed on for ``problem`` (it must be among this method's ``needs``): its product
        for this context's seed, or its only one (a method fitted once)."""
        key = self.product_key(method)
        try:
            return self.products[key if key in self.products else method][problem.name]
        except KeyError:
            raise KeyError(f"{self.name}: no product of {method!r} for problem {problem.name!r}; "
                           "is it declared in the method's needs?") from None
